"""detectron2 (sal-detectron2 0.7.2) and fvcore internals used by pipeline/detection/.

- `init_trainer`: DefaultTrainer.__init__ wraps the model in DDP with device_ids=[local rank], which torch refuses
  for a CPU model; this builds the same trainer with DDP on CPU too. It sets DefaultTrainer's private `_trainer`
  (the SimpleTrainer its run_step and state_dict delegate to), and it checks that DefaultTrainer.__init__ still
  sets exactly the attributes set here: an upgrade that adds one fails here, naming it, not later.
- `load_report`: fvcore's Checkpointer._load_model, the one call that returns the incompatible-keys report
  (`load()` only logs it).
Public replacements are used where they exist: the local process group through get_local_process_group /
create_local_process_group, evaluation results and the writer period through detectron2's hook constructors.
"""

from __future__ import annotations

import inspect
import logging
import re
import weakref
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.compat import CompatError, check_version, installed_version, require

DIST = "sal-detectron2"
TESTED = ("0.7.2",)
check_version(DIST, TESTED)
check_version("fvcore", ("0.1.5.post20221221",))

# what DefaultTrainer.__init__ assigns to self (0.7.2), all set by init_trainer
TRAINER_ATTRIBUTES = {"_trainer", "scheduler", "checkpointer", "start_iter", "max_iter", "cfg"}


def _check_trainer_init() -> None:
    assigned = set(re.findall(r"\bself\.(\w+)\s*=", inspect.getsource(DefaultTrainer.__init__)))
    if assigned != TRAINER_ATTRIBUTES:
        raise CompatError(
            f"{DIST} {installed_version(DIST)}: DefaultTrainer.__init__ now sets {sorted(assigned)}, "
            f"pipeline/compat/detectron2.py sets {sorted(TRAINER_ATTRIBUTES)} (tested with {', '.join(TESTED)}): "
            f"update init_trainer")


def init_trainer(trainer: DefaultTrainer, cfg: CfgNode) -> None:
    """DefaultTrainer.__init__(trainer, cfg), except that the model is wrapped in DDP on CPU too (no device ids)
    in a multi-process job. Hooks are registered last, as detectron2 does."""
    _check_trainer_init()
    super(DefaultTrainer, trainer).__init__()  # TrainerBase
    if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
        setup_logger()
    cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
    model = trainer.build_model(cfg)
    optimizer = trainer.build_optimizer(cfg, model)
    data_loader = trainer.build_train_loader(cfg)
    if comm.get_world_size() > 1:
        device_ids = [comm.get_local_rank()] if cfg.MODEL.DEVICE.startswith("cuda") else None
        model = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    trainer._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
    trainer.scheduler = trainer.build_lr_scheduler(cfg, optimizer)
    trainer.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(trainer))
    trainer.start_iter = 0
    trainer.max_iter = cfg.SOLVER.MAX_ITER
    trainer.cfg = cfg


def ensure_local_process_group(tasks_per_node: int) -> None:
    """The per-machine process group detectron2's launch() would have made (get_local_rank needs it); all ranks
    call this together."""
    try:
        if comm.get_local_process_group() is not None:
            return
    except AssertionError:  # detectron2 asserts that the group exists
        pass
    comm.create_local_process_group(tasks_per_node)


def load_report(model: nn.Module, checkpoint: dict) -> Any:
    """Load `checkpoint` ({"model": ..., "matching_heuristics": ...}) into `model` as training will, through
    detectron2's checkpointer; returns fvcore's report (missing_keys, unexpected_keys, incorrect_shapes)."""
    checkpointer = DetectionCheckpointer(model)
    return require(checkpointer, "_load_model", "fvcore", "detectron2")(checkpoint)
