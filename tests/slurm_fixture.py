"""Session fixture `slurm_cluster`: the real one-node SLURM cluster of slurm/local-cluster/ for the tests."""

import fcntl
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "slurm" / "local-cluster"


@dataclass(frozen=True)
class SlurmCluster:
    partition: str
    state_dir: Path
    slurm_conf: Path


def _sole_user(users: IO) -> bool:
    """Whether no other session holds a shared lock on `users` (turns ours exclusive if so)."""
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Starts the cluster (a no-op when it is up) and points SLURM clients at it through SLURM_CONF.

    A cluster that does not come up fails the tests with the daemon logs: skipping would hide a broken
    set-up. At the end the cluster is stopped only if this fixture started it and no other session (another
    pytest run, a pytest-xdist worker) holds it through the shared lock on <state dir>/.users.
    """
    state_dir = Path(os.environ.get("HNCL_SLURM_DIR", "/tmp/hncl-slurm"))
    state_dir.mkdir(parents=True, exist_ok=True)
    conf = state_dir / "etc" / "slurm.conf"
    with open(state_dir / ".users", "a") as users:
        fcntl.flock(users, fcntl.LOCK_SH)
        start = subprocess.run(["bash", str(SCRIPTS / "start.sh")], capture_output=True, text=True, timeout=300)
        if start.returncode != 0:
            pytest.fail(f"the SLURM test cluster did not start:\n{start.stdout}{start.stderr}", pytrace=False)
        started_here = "(already running)" not in start.stdout
        previous = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(conf)  # submitit's sbatch/sacct/scancel calls inherit it
        try:
            yield SlurmCluster(partition="debug", state_dir=state_dir, slurm_conf=conf)
        finally:
            if previous is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = previous
            if started_here and _sole_user(users):
                subprocess.run(["bash", str(SCRIPTS / "stop.sh")], capture_output=True, timeout=120)
