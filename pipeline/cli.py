"""What every stage entry point shares: params loading, one-line errors, atomic JSON outputs."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.checkpoint import atomic_write
from pipeline.config import ConfigError, Params, load_params


def write_json(path: str | Path, obj: dict) -> None:
    """Write JSON atomically (temp file + rename), so a metrics file is never half-written."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def run_stage(name: str, main: Callable[[Params], None], params_path: str = "params.yaml") -> None:
    """Load and validate params, run `main`; bad input ends the stage with one line and exit code 2."""
    try:
        main(load_params(params_path))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
