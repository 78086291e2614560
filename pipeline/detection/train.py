"""Detectron2 fine-tuning of a converted backbone: Faster R-CNN C4 on VOC, Mask R-CNN C4 on COCO.

One `finetune()` runs the trials of a task inside a launcher job (here or SLURM, one DDP process per
task). Each trial is detectron2's DefaultTrainer with three changes: DDP also on CPU (gloo, no device
ids), a hook that checkpoints and requeues on SLURM's preemption signal, and a plain progress log.
A trial resumes from detectron2's `last_checkpoint` in its folder, provided the folder was written for
the same run (params and weights); otherwise the folder is cleared and the trial starts again.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import statistics
import time
from pathlib import Path

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, JSONWriter
from detectron2.utils.logger import setup_logger
from fvcore.nn.precise_bn import get_bn_modules

from pipeline.checkpoint import params_hash
from pipeline.cli import write_json
from pipeline.compat import detectron2 as d2
from pipeline.config import CocoParams, DetectionRunParams, Params, VocParams
from pipeline.detection.c4 import build_c4_cfg
from pipeline.detection.datasets import check_coco, check_voc, register_coco, register_voc, voc_classes
from pipeline.launch import PreemptionFlag, init_distributed

METRICS = ("AP", "AP50", "AP75")


def detection_cfg(arch: str, task: str, num_classes: int, run: DetectionRunParams, *, train: list[str], test: str,
                  weights: str, output_dir: Path, seed: int, num_workers: int, device: str) -> CfgNode:
    """The MoCo C4 config for `task` ("voc" | "coco") with the schedule and sizes of `run`."""
    cfg = build_c4_cfg(
        arch, task, num_classes, max_iter=run.max_iter, schedule=run.schedule if isinstance(run, CocoParams) else None,
        base_lr=run.base_lr,
        ims_per_batch=run.ims_per_batch, min_size_train=tuple(run.min_size_train),
        max_size_train=run.max_size_train, min_size_test=run.min_size_test, max_size_test=run.max_size_test,
        roi_batch_size=run.roi_batch_size, test_topk=run.test_topk, precise_bn_iters=run.precise_bn_iters,
        weights=weights, device=device,
    )
    cfg.DATASETS.TRAIN = tuple(train)
    cfg.DATASETS.TEST = (test,)
    cfg.DATALOADER.NUM_WORKERS = num_workers
    cfg.SOLVER.CHECKPOINT_PERIOD = run.checkpoint_period
    cfg.TEST.EVAL_PERIOD = 0  # evaluate once, after training
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.SEED = seed
    return cfg


class Trainer(DefaultTrainer):
    """DefaultTrainer whose model is wrapped in DDP on CPU too, with VOC/COCO evaluators, a plain progress log
    and a checkpoint-and-requeue hook for SLURM preemption. `eval_results` holds the final evaluation."""

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__ wraps DDP with device_ids=[local rank], which torch refuses for a CPU model
        d2.init_trainer(self, cfg)
        self.preemption = PreemptionFlag()
        self.eval_results: dict | None = None
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str) -> DatasetEvaluator:
        if MetadataCatalog.get(dataset_name).get("evaluator_type") == "coco":  # set by register_coco_instances
            # detectron2's fast COCOeval is a compiled extension this CPU install does not have
            return COCOEvaluator(dataset_name, tasks=("bbox", "segm"), output_dir=cfg.OUTPUT_DIR, use_fast_impl=False)
        return PascalVOCDetectionEvaluator(dataset_name)

    def build_writers(self) -> list:
        return [CommonMetricPrinter(self.max_iter), JSONWriter(str(Path(self.cfg.OUTPUT_DIR) / "metrics.json"))]

    def build_hooks(self) -> list:
        """DefaultTrainer's hooks, built with their public constructors: timer, lr schedule, precise BN,
        checkpoints (rank 0), the final evaluation kept in `eval_results`, about ten progress lines per run;
        plus the step timer and the preemption hook."""
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0  # as detectron2: the precise-BN loader need not be fast
        self.step_timer = _StepTimer()
        out = [self.step_timer, hooks.IterationTimer(), hooks.LRScheduler()]
        if cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model):
            out.append(hooks.PreciseBN(cfg.TEST.EVAL_PERIOD, self.model, self.build_train_loader(cfg),
                                       cfg.TEST.PRECISE_BN.NUM_ITER))
        if comm.is_main_process():
            out.append(hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD))

        def evaluate() -> dict:
            self.eval_results = self.test(self.cfg, self.model)
            return self.eval_results

        out += [hooks.EvalHook(cfg.TEST.EVAL_PERIOD, evaluate), _CheckpointOnPreemption()]
        if comm.is_main_process():
            out.append(hooks.PeriodicWriter(self.build_writers(), period=max(1, min(20, self.max_iter // 10))))
        return out


class _StepTimer(HookBase):
    """Seconds spent in training steps (data, forward, backward, update), for images/s without evaluation."""

    def __init__(self):
        self.seconds, self.steps, self._t0 = 0.0, 0, 0.0

    def before_step(self) -> None:
        self._t0 = time.perf_counter()

    def after_step(self) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.steps += 1


class _CheckpointOnPreemption(HookBase):
    """On SLURM's preemption / time-limit signal: save after the current step, then requeue the job."""

    def after_step(self) -> None:
        t = self.trainer
        if t.preemption.is_set():
            t.checkpointer.save(f"model_{t.iter:07d}", iteration=t.iter)
            logging.getLogger(__name__).info("preempted at iteration %d: checkpoint saved, requeueing", t.iter)
            t.preemption.requeue()


def _register(p: Params, task: str) -> tuple[list[str], str, int]:
    """Check the data set on disk and register it with detectron2: (train names, test name, classes)."""
    if task == "voc":
        c: VocParams = p.detection.voc
        root = Path(c.root)
        for split in c.train_splits:
            check_voc(root, split)
        check_voc(root, c.test_split, for_evaluation=True)
        classes = voc_classes(root, c.train_splits)
        names = register_voc(root, [*c.train_splits, c.test_split], classes)
        return names[:-1], names[-1], len(classes)
    c: CocoParams = p.detection.coco
    root = Path(c.root)
    for split in (c.train_split, c.test_split):
        check_coco(root, split)
    train, test = register_coco(root, c.train_split), register_coco(root, c.test_split)
    return [train], test, len(MetadataCatalog.get(test).thing_classes)  # COCO splits share their categories


def _prepare(out: Path, identity: str) -> None:
    """Keep `out` for resuming only if it was written for this very run; else start it afresh."""
    marker = out / "identity.txt"
    if out.exists() and (not marker.is_file() or marker.read_text().strip() != identity):
        print(f"detection: {out} holds another run's checkpoints; starting afresh", flush=True)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(identity + "\n")


def finetune(p: Params, task: str, weights: Path, out_dir: Path, identity: str = "") -> dict:
    """All trials of `task` from the converted `weights`; mean and std of AP, AP50, AP75 per result type.

    A trial resumes from its checkpoints in out_dir only if they were written with the same detectron2
    config, weights and `identity` (the stage's code and data: cli.stage_identity).

    Runs in each process of the job; rank 0's return value is the stage's metrics."""
    rank, world, device = init_distributed()
    if world > 1:  # detectron2's launch() would have made the per-node group
        d2.ensure_local_process_group(p.launch.tasks_per_node)
    setup_logger(name="detectron2", distributed_rank=rank)
    run: DetectionRunParams = getattr(p.detection, task)
    train, test, num_classes = _register(p, task)
    weights_digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    trials = []
    for trial in range(run.trials):
        out = out_dir / f"trial{trial}"
        cfg = detection_cfg(p.model.arch, task, num_classes, run, train=train, test=test, weights=str(weights),
                            output_dir=out, seed=run.seed + trial, num_workers=p.detection.num_workers,
                            device=str(device.type))
        if rank == 0:
            _prepare(out, params_hash({"cfg": cfg.dump(), "weights": weights_digest, "stage": identity}))
        comm.synchronize()
        trials.append(_train_trial(cfg, trial, run.trials))
    return summarize(trials) | {"task": task, "init": p.detection.init, "iterations": run.max_iter,
                                "classes": num_classes, "world_size": world}


def _train_trial(cfg: CfgNode, trial: int, trials: int) -> dict:
    seed_all_rng(cfg.SEED + comm.get_rank())
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    start = trainer.start_iter
    print(f"detection: trial {trial + 1}/{trials} " + (f"resumes at iteration {start}" if start else "starts")
          + f" of {cfg.SOLVER.MAX_ITER}, output {cfg.OUTPUT_DIR}", flush=True)
    t0 = time.time()
    trainer.train()
    results = trainer.eval_results
    wall = time.time() - t0
    train_s, steps = trainer.step_timer.seconds, trainer.step_timer.steps
    out = {kind: {m: float(r[m]) for m in METRICS} for kind, r in (results or {}).items() if kind in ("bbox", "segm")}
    out["timing"] = {"wall_s": round(wall, 1), "train_s": round(train_s, 1), "resumed_at": start,
                     "train_images_per_s": round(steps * cfg.SOLVER.IMS_PER_BATCH / train_s, 2) if steps else None}
    if comm.is_main_process():
        write_json(Path(cfg.OUTPUT_DIR) / "results.json", out)
    return out


def summarize(trials: list[dict]) -> dict:
    """Mean and (sample) std over trials of each AP metric, as the papers report VOC over 5 runs."""
    out: dict = {"trials": trials}
    for kind in ("bbox", "segm"):
        runs = [t[kind] for t in trials if kind in t]
        if not runs:
            continue
        out[kind] = {}
        for m in METRICS:
            values = [r[m] for r in runs]
            out[kind][m] = round(statistics.fmean(values), 3)
            out[kind][f"{m}_std"] = round(statistics.stdev(values), 3) if len(values) > 1 else 0.0
    return out

