"""Paper settings as named presets: presets/<name>.yaml, each a partial params.yaml.

    python -m pipeline.presets apply in1k mochi-128-1024-512 voc-24k coco-1x
        writes those keys into params.yaml (its comments kept; a later preset wins over an earlier one),
        after checking that the result validates. params.yaml then shows every value in effect, and DVC
        re-runs exactly the stages whose params changed.
    dvc exp run $(python -m pipeline.presets flags in100 synco)
        the same as `-S key=value` arguments, for an experiment that leaves params.yaml alone.
    python -m pipeline.presets imagenet100 /datasets/imagenet data/imagenet100
        CMC's 100-class subset (presets/imagenet100.txt) of an ImageFolder ImageNet, as symlinks.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

from pipeline.checkpoint import atomic_write
from pipeline.config import ConfigError, Params, load_params, read_yaml_mapping

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def available() -> list[str]:
    return sorted(f.stem for f in PRESETS.glob("*.yaml"))


def leaves(names: list[str]) -> dict[str, Any]:
    """The presets' settings as {"pretrain.mochi.n_hard": 128, ...}, later presets winning."""
    out: dict[str, Any] = {}
    for name in names:
        path = PRESETS / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"preset {name!r} not found in {PRESETS}; available: {', '.join(available())}")
        out |= flatten(read_yaml_mapping(path, "params sections"))
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested params -> {dotted key: leaf}; an empty mapping is a leaf."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        flat |= flatten(value, dotted + ".") if isinstance(value, dict) and value else {dotted: value}
    return flat


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """The inverse of flatten for one key: tree[a][b][c] = value for "a.b.c", making missing sections."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def apply(names: list[str], params_path: str | Path = "params.yaml") -> Params:
    """Write the presets into params_path and return the validated params; nothing is written if the
    result does not validate."""
    params_path = Path(params_path)
    rt = YAML()  # round trip: keeps the comments and layout of params.yaml
    rt.preserve_quotes = True
    doc = rt.load(params_path.read_text())
    for dotted, value in leaves(names).items():
        if isinstance(value, list):
            value = CommentedSeq(value)
            value.fa.set_flow_style()
        set_dotted(doc, dotted, value)
    buf = io.StringIO()
    rt.dump(doc, buf)
    trial = params_path.parent / f".{params_path.name}.presets-check"  # beside it: profiles resolve the same
    try:
        trial.write_text(buf.getvalue())
        params = load_params(trial)
    finally:
        trial.unlink(missing_ok=True)
    atomic_write(params_path, lambda f: f.write(buf.getvalue().encode()))
    return params


def flags(names: list[str]) -> list[str]:
    """`-S key=value` arguments of `dvc exp run` that set the presets' values."""
    out = []
    for dotted, value in leaves(names).items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        out += ["-S", f"{dotted}={text}"]
    return out


def imagenet100(imagenet: str | Path, out: str | Path) -> int:
    """Link the 100 CMC classes of an ImageFolder ImageNet (train/ and val/ with one folder per wnid) into
    out/{train,val}; returns the number of class folders linked."""
    imagenet, out = Path(imagenet).resolve(), Path(out)
    wnids = (PRESETS / "imagenet100.txt").read_text().split()
    linked = 0
    for split in ("train", "val"):
        missing = [w for w in wnids if not (imagenet / split / w).is_dir()]
        if missing:
            raise FileNotFoundError(f"{imagenet / split}: {len(missing)} of the 100 classes are not folders there "
                                    f"(e.g. {', '.join(missing[:3])}); val must be sorted into class folders too")
        (out / split).mkdir(parents=True, exist_ok=True)
        for w in wnids:
            link = out / split / w
            if not link.is_symlink():
                link.symlink_to(imagenet / split / w, target_is_directory=True)
            linked += 1
    return linked


def main(argv: list[str]) -> None:
    usage = (f"usage: python -m pipeline.presets apply|flags PRESET... | imagenet100 IMAGENET OUT\n"
             f"presets: {', '.join(available())}")
    if len(argv) < 2 or argv[0] not in ("apply", "flags", "imagenet100"):
        sys.exit(usage)
    try:
        if argv[0] == "apply":
            p = apply(argv[1:])
            print(f"params.yaml: applied {', '.join(argv[1:])} (world size {p.world_size}, global batch "
                  f"{p.pretrain.batch_size * p.world_size}, lr {p.pretrain.lr} per 256)")
        elif argv[0] == "flags":
            print(" ".join(flags(argv[1:])))
        else:
            if len(argv) != 3:
                sys.exit(usage)
            print(f"imagenet100: linked {imagenet100(argv[1], argv[2])} class folders into {argv[2]}")
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"presets: error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
