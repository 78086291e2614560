"""submitit 1.5.4 internals used by pipeline/launch.py and the SLURM tests.

- `SlurmJobEnvironment.USR_SIG` (submitit.slurm.slurm, not exported): the signal submitit takes for preemption
  and time-outs (USR2 unless SUBMITIT_PREEMPT_SIGNAL); the training loop turns it into a flag.
- `Job._interrupt()`: what SLURM sends before a preemption (SIGTERM, then USR2), for the tests.
- `Job._results_timeout_s`: how long result() waits for a result file a slow file system may not show yet;
  a test of a cancelled job sets it to 0 (no file will come).
"""

from __future__ import annotations

import signal

import submitit
from submitit.slurm import slurm

from pipeline.compat import check_version, require

TESTED = ("1.5.4",)
check_version("submitit", TESTED)


def preemption_signal() -> signal.Signals:
    """The signal submitit handles as a preemption or time-out."""
    return getattr(signal, f"SIG{require(slurm.SlurmJobEnvironment, 'USR_SIG', 'submitit', 'submitit')}")


def interrupt(job: submitit.Job) -> None:
    """Signal `job` as SLURM does before preempting it (SIGTERM, then the preemption signal)."""
    require(job, "_interrupt", "submitit", "submitit")()


def expect_no_result(job: submitit.Job) -> None:
    """result() of `job` fails at once instead of waiting for a result file that will not come."""
    require(job, "_results_timeout_s", "submitit", "submitit")
    job._results_timeout_s = 0
