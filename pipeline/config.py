"""The params.yaml schema: the single source of defaults, types and allowed values for every stage.

Each section is a dataclass; a field's `metadata` holds its constraints (`choices`, `min`, `max`,
`min_exclusive`). `load_params` turns params.yaml into `Params` and stops with one line naming the key
and what is allowed, before any stage does work.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

ARCHS = ("resnet18", "resnet50")


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
    counts: list = _f([6, 6, 6, 2, 2, 2])  # n1..n6; 0 switches a type off
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
    hard_start_epoch: int = _f(2, min=0)  # synthetic negatives from this epoch on (papers: 10 on IN-100, 15 on IN-1k)
    mochi: MochiParams = field(default_factory=MochiParams)
    synco: SyncoParams = field(default_factory=SyncoParams)
    epochs: int = _f(20, min=1)
    batch_size: int = _f(64, min=2)  # per process; the global batch is batch_size x world size
    lr: float = _f(0.12, min_exclusive=0)  # per 256 images of global batch (linear scaling rule)
    momentum: float = _f(0.9, min=0, max=1)
    weight_decay: float = _f(1e-4, min=0)
    schedule: str = _f("cosine", choices=("cosine", "step", "constant"))
    lr_steps: list = _f([0.6, 0.8])  # fractions of training at which "step" multiplies lr by 0.1
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
    crop_scale: list = _f([0.2, 1.0])
    blur_sigma: list = _f([0.1, 2.0])  # MoCo v2 uses 0.1-2.0 px at 224 px
    seed: int = _f(0, min=0)


@dataclass
class LinevalParams:
    checkpoint: str = _f("")  # "" = this pipeline's pretrain output; else a MoCo-format checkpoint file
    epochs: int = _f(30, min=1)
    batch_size: int = _f(256, min=1)
    lr: float = _f(10.0, min_exclusive=0)  # MoCo: 30 on IN-1k, 10 on IN-100 (batch 256)
    momentum: float = _f(0.9, min=0, max=1)
    weight_decay: float = _f(0.0, min=0)
    lr_steps: list = _f([0.6, 0.8])  # MoCo: x0.1 at epochs 60 and 80 of 100
    res: int = _f(32, min=8)
    augment: bool = _f(False)  # RandomResizedCrop+flip per epoch (reference); False = features computed once
    seed: int = _f(0, min=0)


@dataclass
class KnnParams:
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
    min_size_train: list = _f([128])  # shorter side, one drawn per image (paper VOC: 480..800, COCO 640..800)
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
    train_splits: list = _f(["VOC2007/trainval", "VOC2012/trainval"])  # <year folder>/<ImageSets/Main split>
    test_split: str = _f("VOC2007/test")


@dataclass
class CocoParams(DetectionRunParams):
    root: str = _f("data/toy_det/coco")  # holds annotations/instances_<split>.json and <split>/ images
    train_split: str = _f("train2017")
    test_split: str = _f("val2017")
    schedule: str = _f("1x", choices=("1x", "2x"))  # shape of the lr steps; max_iter sets the length


@dataclass
class DetectionParams:
    checkpoint: str = _f("")  # "" = this pipeline's pretrain output; else an official MoCo checkpoint
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
    extra_sbatch: dict = _f({})  # any other sbatch option, e.g. {exclusive: true}
    local_scratch: str = _f("")  # copy the .beton files to this node-local dir before training ("" = read in place)


@dataclass
class Params:
    data: DataParams = field(default_factory=DataParams)
    toy: ToyParams = field(default_factory=ToyParams)
    model: ModelParams = field(default_factory=ModelParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)
    lineval: LinevalParams = field(default_factory=LinevalParams)
    knn: KnnParams = field(default_factory=KnnParams)
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
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, f: Any, tp: Any) -> Any:
    """Type-check one leaf value (int accepted for float) and apply its metadata constraints."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"params: {key} = {value!r} must be of type {_type_name(tp)}")
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
        raise ConfigError(f"params: {prefix or 'the file'} must be a mapping, got {raw!r}")
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
            values[name] = _build(tp, raw.get(name, {}), key)
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
    if pt.method != "moco" and pt.hard_start_epoch >= pt.epochs:
        raise ConfigError(
            f"params: pretrain.hard_start_epoch = {pt.hard_start_epoch} must be < pretrain.epochs = {pt.epochs}, "
            f"else pretrain.method = {pt.method} never synthesizes a negative"
        )
    counts = pt.synco.counts
    if len(counts) != 6 or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise ConfigError(f"params: pretrain.synco.counts = {counts!r} must be six integers >= 0 (n1..n6)")
    if pt.method == "mochi" and pt.mochi.s + pt.mochi.s_prime == 0 or pt.method == "synco" and sum(counts) == 0:
        raise ConfigError(f"params: pretrain.method = {pt.method} with no synthetic negatives (all counts 0)")
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
    for key, steps in (("pretrain.lr_steps", pt.lr_steps), ("lineval.lr_steps", p.lineval.lr_steps)):
        if not all(isinstance(s, (int, float)) and 0 < s < 1 for s in steps) or list(steps) != sorted(steps):
            raise ConfigError(f"params: {key} = {steps!r} must be increasing fractions of training in (0, 1)")


def _profile(params_path: Path, name: str) -> dict:
    """A named cluster profile: slurm/profiles/<name>.yaml beside params.yaml, a `launch:` mapping."""
    path = params_path.parent / "slurm" / "profiles" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(f.stem for f in path.parent.glob("*.yaml"))
        raise ConfigError(f"params: launch.profile = {name!r}: no file {path} (profiles: {', '.join(known) or 'none'})")
    launch = (yaml.safe_load(path.read_text()) or {}).get("launch", {})
    if not isinstance(launch, dict):
        raise ConfigError(f"params: {path}: 'launch' must be a mapping")
    return launch


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read, type-check and validate params.yaml; raises ConfigError with one line naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params: file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"params: {path} is not valid YAML: {e}") from None
    launch = raw.get("launch") or {}
    if isinstance(launch, dict) and launch.get("profile"):
        raw["launch"] = _profile(path, launch["profile"]) | launch
    params = _build(Params, raw, "")
    _check_cross(params)
    return params


def require_dir(key: str, value: str) -> Path:
    """A data path from params that a stage is about to read: fail now, naming the key, if it is missing."""
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"params: {key} = {value!r}: directory not found")
    return path
