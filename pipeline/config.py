"""The params.yaml schema: the single source of defaults, types and allowed values for every stage.

Each section is a dataclass; a field's `metadata` holds its constraints (`choices`, `min`, `max`,
`min_exclusive`). `load_params` turns params.yaml into `Params` and stops with one line naming the key
and what is allowed, before any stage does work.
"""

from __future__ import annotations

import difflib
import math
import sys
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

ARCHS = ("resnet18", "resnet50")
# The pretrain stage's output: the default weights of the stages that evaluate a backbone. A path, not "",
# so that dvc.yaml can list `${lineval.checkpoint}` as the stage's dependency, whichever file it is.
PRETRAINED = "models/pretrain/checkpoint.pt"


class ConfigError(ValueError):
    """A params.yaml value that no stage can run with; the message names the key."""


def _f(default: Any, **constraints: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=constraints)
    return field(default=default, metadata=constraints)


@dataclass
class ToyParams:
    """The built-in toy set: textures whose class is the pattern, never the colour (see pipeline/data/toy.py)."""

    classes: int = _f(15, min=2, max=15)
    train_per_class: int = _f(160, min=1)
    val_per_class: int = _f(50, min=1)
    size: int = _f(32, min=16)
    seed: int = _f(0, min=0)


@dataclass
class DataParams:
    train_dir: str = _f("data/toy/train")
    val_dir: str = _f("data/toy/val")
    max_resolution: int = _f(32, min=8)  # longest side stored in the .beton (JPEG)
    jpeg_quality: int = _f(90, min=1, max=100)
    on_corrupt: str = _f("fail", choices=("fail", "skip"))
    num_workers: int = _f(2, min=1)
    # where aug+'s colour ops run: cpu = in the loader's threads; cuda = in the training step on the GPU
    # (the loader then hands over uint8 crops); auto = where training runs
    augment_device: str = _f("auto", choices=("auto", "cpu", "cuda"))


@dataclass
class ModelParams:
    arch: str = _f("resnet18", choices=ARCHS)


@dataclass
class MochiParams:
    """MoCHi(N, s, s'): s mixes of two hard negatives, s' mixes of the query with one, from its top N."""

    n_hard: int = _f(16, min=2)  # N (toy scale, for K 256; the papers' values are presets)
    s: int = _f(16, min=0)
    s_prime: int = _f(8, min=0)


@dataclass
class SyncoParams:
    """SynCo: six synthetic types from each query's top N (interpolated, extrapolated, mixup, noise,
    perturbed, adversarial)."""

    n_hard: int = _f(16, min=2)  # N (toy scale, for K 256; the paper's values are the synco preset)
    counts: list[int] = _f([6, 6, 6, 2, 2, 2])  # n1..n6; 0 switches a type off
    sigma: float = _f(0.01, min=0)  # type 4 noise std
    delta: float = _f(0.01, min=0)  # type 5 step
    eta: float = _f(0.01, min=0)  # type 6 step


@dataclass
class PretrainParams:
    method: str = _f("moco", choices=("moco", "mochi", "synco"))
    loss: str = _f("infonce", choices=("infonce", "dcl", "hcl"))
    tau_plus: float = _f(0.1, min=0, max_exclusive=1)  # DCL/HCL class prior (~1/C)
    beta: float = _f(1.0, min=0)  # HCL concentration
    drop_hardest: float = _f(0.0, min=0, max_exclusive=1)  # fraction of each query's queue presumed false negatives
    hard_start_epoch: int = _f(3, min=1)  # first epoch (from 1) with synthetic negatives (papers: 11 / 16)
    mochi: MochiParams = field(default_factory=MochiParams)
    synco: SyncoParams = field(default_factory=SyncoParams)
    epochs: int = _f(20, min=1)
    batch_size: int = _f(64, min=2)  # per process; the global batch is batch_size x world size
    lr: float = _f(0.12, min_exclusive=0)  # per 256 images of global batch (linear scaling rule)
    momentum: float = _f(0.9, min=0, max=1)
    weight_decay: float = _f(1e-4, min=0)
    schedule: str = _f("cosine", choices=("cosine", "step", "constant"))
    lr_steps: list[float] = _f([0.6, 0.8])  # fractions of training at which "step" multiplies lr by 0.1
    res: int = _f(32, min=8)
    dim: int = _f(128, min=1)  # feature dimension of the projection head
    queue_size: int = _f(256, min=1)  # K
    queue_init: str = _f("keys", choices=("keys", "random"))  # "random" = MoCo's reference
    key_momentum: float = _f(0.99, min=0, max=1)  # m
    temperature: float = _f(0.2, min_exclusive=0)  # T
    mlp: bool = _f(True)  # v2 projection head (fc-ReLU-fc); False = v1 linear head
    bn_splits: int = _f(8, min=1)  # one process: emulate shuffle BN with this many BN groups (1 = off)
    precision: str = _f("auto", choices=("auto", "fp32", "bf16"))  # autocast of forward + loss; auto: bf16 on GPU
    memory_format: str = _f("auto", choices=("auto", "contiguous", "channels_last"))  # auto: channels_last on GPU
    analysis_every: int = _f(2, min=1)  # epochs between the analyses of the val set (and the last epoch)
    wordnet: str = _f("/usr/share/wordnet/data.noun")  # WordNet 3.0 nouns, for classes named by ImageNet ids; "" = off
    keep_every: int = _f(0, min=0)  # also keep checkpoints/pretrain/epoch_<n>.pt every this many epochs (0 = off)
    crop_scale: list[float] = _f([0.2, 1.0])
    blur_sigma: list[float] = _f([0.1, 2.0])  # MoCo v2 uses 0.1-2.0 px at 224 px
    seed: int = _f(0, min=0)


@dataclass
class LinevalParams:
    checkpoint: str = _f(PRETRAINED)  # weights to evaluate: this pipeline's, MoCo's, torchvision's or timm's
    epochs: int = _f(30, min=1)
    batch_size: int = _f(256, min=1)
    lr: float = _f(10.0, min_exclusive=0)  # MoCo: 30 on IN-1k, 10 on IN-100 (batch 256)
    momentum: float = _f(0.9, min=0, max=1)
    weight_decay: float = _f(0.0, min=0)
    lr_steps: list[float] = _f([0.6, 0.8])  # MoCo: x0.1 at epochs 60 and 80 of 100
    res: int = _f(32, min=8)
    augment: bool = _f(False)  # RandomResizedCrop+flip per epoch (reference); False = features computed once
    seed: int = _f(0, min=0)


@dataclass
class SemisupParams:
    """Semi-supervised evaluation: the whole backbone and a new linear classifier fine-tuned on a labelled
    fraction of the train set, val top-1/top-5, for each fraction and trial; the random-init control gets the
    same schedule and subsets. The papers' recipe is the semisup-in1k preset."""

    fractions: list = _f([0.01, 0.1])  # of the train images, each in (0, 1]
    trials: int = _f(3, min=1)  # seeds seed..seed+trials-1: subset (balanced), classifier init, batch order
    subset: str = _f("balanced", choices=("balanced", "simclr"))  # simclr: SimCLR's ImageNet 1% / 10% lists
    simclr_dir: str = _f("presets/imagenet_subsets")  # holds SimCLR's 1percent.txt and 10percent.txt
    epochs: list = _f([15])  # one for all fractions, or one per fraction (SynCo: [60, 30] for 1%, 10%)
    batch_size: int = _f(32, min=2)  # capped at the subset size (full batches only: BN trains on them)
    lr_backbone: float = _f(0.0005, min=0)  # absolute, not per 256 (as the reference); 1:100 to the classifier's
    lr_classifier: float = _f(0.05, min_exclusive=0)  # SynCo: 0.5 with backbone 0.005 (diverged on the toy)
    momentum: float = _f(0.9, min=0, max=1)
    weight_decay: float = _f(1e-6, min=0)
    res: int = _f(32, min=8)
    control: bool = _f(True)  # also fine-tune the random-init backbone the kNN control uses
    seed: int = _f(0, min=0)


@dataclass
class KnnParams:
    checkpoint: str = _f(PRETRAINED)  # weights to evaluate, as lineval.checkpoint
    k: int = _f(20, min=1)  # MoCo uses 200 on ImageNet (1300 images a class)
    temperature: float = _f(0.07, min_exclusive=0)
    res: int = _f(32, min=8)
    batch_size: int = _f(256, min=1)


@dataclass
class ToyDetectionParams:
    """The built-in toy detection set: objects filled with the toy textures on soft backgrounds, written as
    VOCdevkit and as COCO (pipeline/data/toy_detection.py)."""

    classes: int = _f(4, min=1, max=15)
    train_images: int = _f(128, min=4)  # split between VOC2007 and VOC2012 trainval; all of COCO train2017
    test_images: int = _f(48, min=2)  # VOC2007 test and COCO val2017
    size: int = _f(128, min=32)
    seed: int = _f(0, min=0)


@dataclass
class DetectionRunParams:
    """One detectron2 fine-tuning schedule (the toy values fit a CPU; presets hold the paper's)."""

    max_iter: int = _f(100, min=1)
    base_lr: float = _f(0.02, min_exclusive=0)  # for ims_per_batch images (paper: 0.02 at 16)
    ims_per_batch: int = _f(4, min=1)  # global batch (paper: 16)
    min_size_train: list[int] = _f([128])  # shorter side, one drawn per image (paper VOC: 480..800, COCO 640..800)
    max_size_train: int = _f(160, min=16)
    min_size_test: int = _f(128, min=16)
    max_size_test: int = _f(160, min=16)
    roi_batch_size: int = _f(16, min=1)  # ROIs per image for the head (paper: 512; the CPU cost is ~linear in it)
    test_topk: int = _f(50, min=1)  # proposals kept per test image (paper: 1000)
    precise_bn_iters: int = _f(4, min=0)  # paper: 200
    checkpoint_period: int = _f(50, min=1)  # iterations between detectron2 checkpoints (resume points)
    trials: int = _f(1, min=1)  # independent runs with seeds seed..seed+trials-1 (papers: 5 on VOC)
    seed: int = _f(0, min=0)


@dataclass
class VocParams(DetectionRunParams):
    root: str = _f("data/toy_det/VOCdevkit")  # a VOCdevkit folder holding VOC2007 (and VOC2012)
    train_splits: list[str] = _f(["VOC2007/trainval", "VOC2012/trainval"])  # <year folder>/<ImageSets/Main split>
    test_split: str = _f("VOC2007/test")


@dataclass
class CocoParams(DetectionRunParams):
    root: str = _f("data/toy_det/coco")  # holds annotations/instances_<split>.json and <split>/ images
    train_split: str = _f("train2017")
    test_split: str = _f("val2017")
    schedule: str = _f("1x", choices=("1x", "2x"))  # shape of the lr steps; max_iter sets the length


@dataclass
class DetectionParams:
    checkpoint: str = _f(PRETRAINED)  # weights to fine-tune, as lineval.checkpoint (unused for init: random)
    init: str = _f("pretrained", choices=("pretrained", "random"))  # random: the control, same schedule
    num_workers: int = _f(2, min=0)  # detectron2 data loader workers per process
    toy: ToyDetectionParams = field(default_factory=ToyDetectionParams)
    voc: VocParams = field(default_factory=VocParams)
    coco: CocoParams = field(default_factory=CocoParams)


@dataclass
class LaunchParams:
    """Where stages run: here (local) or as SLURM jobs through submitit. Chosen explicitly, never guessed."""

    executor: str = _f("local", choices=("local", "slurm"))
    profile: str = _f("")  # slurm/profiles/<profile>.yaml: cluster defaults under the keys set here
    partition: str = _f("")
    account: str = _f("")
    qos: str = _f("")
    constraint: str = _f("")
    nodes: int = _f(1, min=1)
    tasks_per_node: int = _f(1, min=1)  # one DDP process per task (per GPU)
    gpus_per_node: int = _f(0, min=0)
    cpus_per_task: int = _f(2, min=1)
    mem_gb: int = _f(8, min=1)
    timeout_min: int = _f(60, min=1)
    signal_delay_s: int = _f(120, min=0)  # preemption/time-limit signal this long before the end: checkpoint + requeue
    max_requeues: int = _f(10, min=0)
    extra_sbatch: dict[str, str | int | float | bool] = _f({})  # any other sbatch option, e.g. {exclusive: true}
    local_scratch: str = _f("")  # copy the .beton files to this node-local dir before training ("" = read in place)
    setup: list = _f([])  # shell lines run in the job script before the tasks start (module load, conda activate)


@dataclass
class Params:
    data: DataParams = field(default_factory=DataParams)
    toy: ToyParams = field(default_factory=ToyParams)
    model: ModelParams = field(default_factory=ModelParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)
    lineval: LinevalParams = field(default_factory=LinevalParams)
    knn: KnnParams = field(default_factory=KnnParams)
    semisup: SemisupParams = field(default_factory=SemisupParams)
    detection: DetectionParams = field(default_factory=DetectionParams)
    launch: LaunchParams = field(default_factory=LaunchParams)

    @property
    def world_size(self) -> int:
        """Processes of one training job: nodes x tasks per node on SLURM, 1 locally."""
        lp = self.launch
        return lp.nodes * lp.tasks_per_node if lp.executor == "slurm" else 1

    def to_dict(self) -> dict:
        return asdict(self)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(t) for t in typing.get_args(tp))
    if typing.get_origin(tp) is not None:
        return str(tp)
    return getattr(tp, "__name__", str(tp))


def _kind(value: Any) -> str:
    """'a list', 'a str'...: how a wrong value is described in an error."""
    name = type(value).__name__
    return "nothing (null)" if value is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """`value` as type `tp` (int accepted for float; lists, dicts and unions checked element by element). Every
    float must be finite: a `.nan` or `.inf` would pass each min/max comparison as False and fail much later."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_type(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"params: {key} = {value!r} must be of type {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"params: {key} = {value!r} must be a list of {_type_name(typing.get_args(tp)[0])}")
        return [_check_type(f"{key}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"params: {key} = {value!r} must be a mapping")
        return {_check_type(f"{key} (a key)", k, key_tp): _check_type(f"{key}.{k}", v, value_tp)
                for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, tp) or (tp in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"params: {key} = {value!r} must be of type {_type_name(tp)}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"params: {key} = {value!r} must be a finite number")
    return value


def _check_value(key: str, value: Any, f: Any, tp: Any) -> Any:
    """Type-check one leaf value and apply its metadata constraints."""
    value = _check_type(key, value, tp)
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"params: {key} = {value!r} is not one of {', '.join(map(str, meta['choices']))}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"params: {key} = {value!r} must be >= {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"params: {key} = {value!r} must be <= {meta['max']}")
    if "min_exclusive" in meta and value <= meta["min_exclusive"]:
        raise ConfigError(f"params: {key} = {value!r} must be > {meta['min_exclusive']}")
    if "max_exclusive" in meta and value >= meta["max_exclusive"]:
        raise ConfigError(f"params: {key} = {value!r} must be < {meta['max_exclusive']}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"params: {prefix or 'the top level'} must be a mapping of keys "
                          f"({', '.join(f.name for f in fields(cls))}), got {_kind(raw)}: {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = f"{prefix}." if prefix else ""
            raise ConfigError(
                f"params: unknown key '{where}{key}'{hint}; allowed in {prefix or 'top level'}: "
                f"{', '.join(known)}"
            )
    values = {}
    for name, f in known.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if is_dataclass(tp):
            values[name] = _build(tp, raw.get(name, {}), key)  # a section present but empty (null) is refused
        elif name in raw:
            values[name] = _check_value(key, raw[name], f, tp)
        else:
            values[name] = f.default if f.default is not MISSING else f.default_factory()
    return cls(**values)


def _check_range_pair(key: str, pair: list, lo: float, hi: float) -> None:
    if len(pair) != 2 or not all(isinstance(v, (int, float)) for v in pair) or not lo <= pair[0] <= pair[1] <= hi:
        raise ConfigError(f"params: {key} = {pair!r} must be [low, high] with {lo} <= low <= high <= {hi}")


def _check_cross(p: Params) -> None:
    """Constraints between keys."""
    pt = p.pretrain
    global_batch = pt.batch_size * p.world_size
    if pt.queue_size % global_batch:
        raise ConfigError(
            f"params: pretrain.queue_size = {pt.queue_size} must be a multiple of the global batch "
            f"{global_batch} (pretrain.batch_size {pt.batch_size} x world size {p.world_size})"
        )
    if pt.batch_size % pt.bn_splits:
        raise ConfigError(
            f"params: pretrain.batch_size = {pt.batch_size} must be divisible by pretrain.bn_splits = {pt.bn_splits}"
        )
    if pt.method != "moco" and pt.hard_start_epoch > pt.epochs:
        raise ConfigError(
            f"params: pretrain.hard_start_epoch = {pt.hard_start_epoch} must be <= pretrain.epochs = {pt.epochs}, "
            f"else pretrain.method = {pt.method} never synthesizes a negative"
        )
    counts = pt.synco.counts
    if len(counts) != 6 or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise ConfigError(f"params: pretrain.synco.counts = {counts!r} must be six integers >= 0 (n1..n6)")
    if pt.method == "mochi" and pt.mochi.s + pt.mochi.s_prime == 0 or pt.method == "synco" and sum(counts) == 0:
        raise ConfigError(f"params: pretrain.method = {pt.method} with no synthetic negatives (all counts 0)")
    dropped = math.ceil(round(pt.drop_hardest * pt.queue_size, 9))  # as losses.drop_hardest counts them
    if dropped >= pt.queue_size:
        raise ConfigError(f"params: pretrain.drop_hardest = {pt.drop_hardest} drops {dropped} of the "
                          f"pretrain.queue_size = {pt.queue_size} negatives: at least one must be left")
    hard = {"mochi": pt.mochi, "synco": pt.synco}.get(pt.method)
    if hard is not None and hard.n_hard > pt.queue_size - dropped:  # the synthesis would silently use fewer
        after = f" minus the {dropped} dropped (pretrain.drop_hardest = {pt.drop_hardest})" if dropped else ""
        raise ConfigError(f"params: pretrain.{pt.method}.n_hard = {hard.n_hard} must be <= pretrain.queue_size = "
                          f"{pt.queue_size}{after}: the hard negatives are each query's top N of the queue")
    _check_range_pair("pretrain.crop_scale", pt.crop_scale, 0.0, 1.0)
    _check_range_pair("pretrain.blur_sigma", pt.blur_sigma, 0.0, 100.0)
    toy = p.detection.toy
    if min(toy.train_images, toy.test_images) < toy.classes:
        raise ConfigError(f"params: detection.toy.train_images and test_images must be >= detection.toy.classes = "
                          f"{toy.classes}, so that every class is in every split")
    for task in ("voc", "coco"):
        run = getattr(p.detection, task)
        key = f"detection.{task}"
        if run.ims_per_batch % p.world_size:
            raise ConfigError(f"params: {key}.ims_per_batch = {run.ims_per_batch} must be a multiple of the world size "
                              f"{p.world_size} (launch.nodes x launch.tasks_per_node)")
        sizes = run.min_size_train
        if not sizes or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            raise ConfigError(f"params: {key}.min_size_train = {sizes!r} must be a non-empty list of positive integers")
        # detectron2 scales the shorter side to min_size unless the longer one would pass max_size: a min_size
        # above max_size is never reached, and the images silently come out smaller than asked
        if max(sizes) > run.max_size_train:
            raise ConfigError(f"params: {key}.min_size_train = {sizes!r} must not exceed {key}.max_size_train = "
                              f"{run.max_size_train}")
        if run.min_size_test > run.max_size_test:
            raise ConfigError(f"params: {key}.min_size_test = {run.min_size_test} must not exceed "
                              f"{key}.max_size_test = {run.max_size_test}")
    setup = p.launch.setup
    if not all(isinstance(line, str) and "\n" not in line for line in setup):
        raise ConfigError(f"params: launch.setup = {setup!r} must be a list of one-line shell commands")
    for key in ("lineval.checkpoint", "knn.checkpoint", "detection.checkpoint"):
        section, name = key.split(".")
        if not getattr(getattr(p, section), name).strip():
            raise ConfigError(f"params: {key} is empty: name a weights file (default {PRETRAINED}, the pretrain "
                              f"stage's output)")
    _check_semisup(p.semisup)
    for key, steps in (("pretrain.lr_steps", pt.lr_steps), ("lineval.lr_steps", p.lineval.lr_steps)):
        if not all(isinstance(s, (int, float)) and 0 < s < 1 for s in steps) or list(steps) != sorted(steps):
            raise ConfigError(f"params: {key} = {steps!r} must be increasing fractions of training in (0, 1)")
    lp = p.launch
    if lp.executor == "slurm" and lp.signal_delay_s >= 60 * lp.timeout_min:  # signalled at start: requeued for ever
        raise ConfigError(f"params: launch.signal_delay_s = {lp.signal_delay_s} must be less than launch.timeout_min "
                          f"= {lp.timeout_min} minutes, else the job is told to checkpoint as soon as it starts")


def read_yaml(path: str | Path) -> Any:
    """A YAML file as DVC reads params.yaml and dvc.yaml (ruamel.yaml, safe, YAML 1.2: `1e-3` is a float,
    `yes` a string, a duplicate key an error). Every stage and tool of this project reads YAML through here, so
    `dvc exp run -S` values mean the same to DVC and to the stages. Syntax errors: one line, file:line:column."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    try:
        return YAML(typ="safe", pure=True).load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = " ".join(str(e.problem or e.context or "invalid YAML").split())
        if e.problem and e.context and e.context_mark and e.context_mark is not mark:
            problem += f" ({e.context} from line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """read_yaml of a file whose top level must be a mapping (an empty file is an empty one)."""
    raw = read_yaml(path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of {what}, got {_kind(raw)}")
    return raw


SIMCLR_FRACTIONS = (0.01, 0.1)  # SimCLR's ImageNet lists: 1percent.txt, 10percent.txt


def _check_semisup(sp: SemisupParams) -> None:
    fr, ep = sp.fractions, sp.epochs
    if not fr or not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in fr):
        raise ConfigError(f"params: semisup.fractions = {fr!r} must be a non-empty list of numbers in (0, 1]")
    bad = [f for f in fr if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"params: semisup.fractions = {fr!r}: {bad[0]} is not in (0, 1]")
    if len(set(fr)) != len(fr):
        raise ConfigError(f"params: semisup.fractions = {fr!r} lists a fraction twice")
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in ep) or len(ep) not in (1, len(fr)):
        raise ConfigError(f"params: semisup.epochs = {ep!r} must be one integer >= 1, or one per fraction "
                          f"({len(fr)} for semisup.fractions = {fr!r})")
    if sp.subset == "simclr" and not set(fr) <= set(SIMCLR_FRACTIONS):
        raise ConfigError(f"params: semisup.fractions = {fr!r}: semisup.subset = simclr has lists for "
                          f"{', '.join(map(str, SIMCLR_FRACTIONS))} only")


def _profile(params_path: Path, name: str) -> tuple[dict, Path]:
    """A named cluster profile: slurm/profiles/<name>.yaml beside params.yaml, a `launch:` mapping whose keys are
    checked here, so that an error names the profile's file; and its path."""
    folder = params_path.parent / "slurm" / "profiles"
    path = folder / f"{name}.yaml"
    if Path(name).name != name or not path.is_file():
        known = sorted(f.stem for f in folder.glob("*.yaml"))
        raise ConfigError(f"params: launch.profile = {name!r}: no file {path} (profiles: {', '.join(known) or 'none'})")
    raw = read_yaml_mapping(path, "sections (launch)")
    if set(raw) - {"launch"}:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(map(repr, sorted(set(raw) - {'launch'})))}; "
                          f"a profile holds only 'launch'")
    launch = raw.get("launch", {})
    try:
        _build(LaunchParams, launch, "launch")
    except ConfigError as e:
        raise ConfigError(f"{path}: {str(e).removeprefix('params: ')}") from None
    return launch, path


def merge_profile(params_path: Path, launch: dict) -> tuple[dict, list[str]]:
    """params.yaml's launch section over its profile's: (merged section, one warning per profile value overridden).

    What wins, from strongest: a launch key in params.yaml (which is where `dvc exp run -S` and
    `python -m pipeline.presets apply` write), then the profile, then the schema default. A preset's launch
    keys therefore beat the profile's: the warning names each one, so none does silently."""
    profile, path = _profile(params_path, launch["profile"])
    warnings = [f"params: warning: launch.{key} = {launch[key]!r} in {params_path.name} overrides {value!r} of the "
                f"profile {path} (params.yaml wins; delete the key there to use the profile's)"
                for key, value in profile.items() if key in launch and launch[key] != value]
    return profile | launch, warnings


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read (as DVC does: read_yaml), type-check and validate params.yaml; raises ConfigError with one line
    naming the key, or the file, line and column of a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params: file not found: {path}")
    try:
        raw = read_yaml_mapping(path, f"sections ({', '.join(f.name for f in fields(Params))})")
    except ConfigError as e:
        raise ConfigError(f"params: {e}") from None
    launch = raw.get("launch")
    warnings: list[str] = []
    if isinstance(launch, dict) and isinstance(launch.get("profile"), str) and launch["profile"]:
        raw["launch"], warnings = merge_profile(path, launch)
    params = _build(Params, raw, "")
    _check_cross(params)
    for line in warnings:  # after validation: an invalid file gets its error alone
        print(line, file=sys.stderr)
    return params


TAU_PLUS_FACTOR = 2.0  # tau+ within a factor of 2 of 1/C passes unremarked


def tau_plus_warning(pt: PretrainParams, num_classes: int, source: str = "classes.txt") -> str | None:
    """A one-line warning when DCL/HCL's class prior tau+ is far from 1/C, else None.

    Why: tau+ is the chance that a negative shares the query's class. Too large (say 0.1 on ImageNet-1k's
    1000 classes) and g = (mean e^{n/T} - tau+ e^{p/T}) / (1 - tau+) falls to its clamp e^{-1/T} for most
    queries, where the negatives get no gradient at all; too small and the debiasing does nothing. InfoNCE
    does not use tau+, so it is not checked then."""
    if pt.loss not in ("dcl", "hcl") or num_classes < 1:
        return None
    prior = 1.0 / num_classes
    if prior / TAU_PLUS_FACTOR <= pt.tau_plus <= prior * TAU_PLUS_FACTOR:
        return None
    return (f"pretrain.tau_plus = {pt.tau_plus:g} is far from 1/C = {prior:.4g} (C = {num_classes} classes in "
            f"{source}); pretrain.loss = {pt.loss} takes tau+ as the class prior")


def require_dir(key: str, value: str) -> Path:
    """A data path from params that a stage is about to read: fail now, naming the key, if it is missing."""
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"params: {key} = {value!r}: directory not found")
    return path
