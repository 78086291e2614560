"""DVC stage validate: check params.yaml (schema, ranges, cross-key rules, launch profile) before any other
stage runs -> params.validated.

Every stage depends on params.validated, so DVC runs this first: a bad value (`dvc exp run -S key=bad`) fails
here, in a second, before DVC has removed any other stage's outputs; the baseline's metrics and weights stay.
The file's content does not depend on the params (it is the same after every successful check), so a change
re-runs this stage but, through it, nothing else: each stage still re-runs only for its own params and deps.
Imports pipeline.config only (no torch), to fail fast."""

import sys
from pathlib import Path

from pipeline.checkpoint import atomic_write
from pipeline.config import ConfigError, load_params

OUT = Path("params.validated")
TEXT = b"params.yaml passed pipeline/config.py's checks\n"


def main(params_path: str = "params.yaml") -> int:
    try:
        load_params(params_path)
    except ConfigError as e:
        print(f"validate: error: {e}", file=sys.stderr)
        return 2
    if not OUT.is_file() or OUT.read_bytes() != TEXT:  # untouched when already there: the stages that list it
        atomic_write(OUT, lambda f: f.write(TEXT))      # as a dependency hash it by size and modification time
    return 0


if __name__ == "__main__":
    sys.exit(main())
