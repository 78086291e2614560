"""submitit's SlurmExecutor on the real one-node cluster: multi-task jobs, cancel, requeue, bad partition.

These are the cluster behaviours the pipeline's launcher relies on; nothing here is mocked.
"""

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from pipeline.compat import submitit as submitit_compat
from tests.conftest import wait_for
from tests.slurm_fixture import SlurmCluster

REPO = Path(__file__).resolve().parents[1]


def rank_and_size() -> tuple[int, int]:
    env = submitit.JobEnvironment()
    return env.global_rank, env.num_tasks


SIGTERMS: list[int] = []  # SIGTERMs this job process received (submitit's handler only logs them)


def _note_sigterm(previous: Callable) -> Callable:
    def handler(signum: int, frame: object) -> None:
        SIGTERMS.append(signum)
        if callable(previous):
            previous(signum, frame)
    return handler


class Counter(submitit.helpers.Checkpointable):
    """Counts to `total`, saving the count to `progress` at each step; a requeued run resumes from it. A fresh run
    holds at `hold_at` until it is interrupted (polling, so that signals are handled): the interrupt always finds
    it mid-count, however slow the machine."""

    def __call__(self, progress: Path, total: int, hold_at: int) -> int:
        signal.signal(signal.SIGTERM, _note_sigterm(signal.getsignal(signal.SIGTERM)))
        start = int(progress.read_text()) if progress.exists() else 0
        with open(progress.parent / "starts", "a") as f:
            f.write(f"{start}\n")
        for count in range(start + 1, total + 1):
            tmp = progress.with_suffix(".tmp")
            tmp.write_text(str(count))
            os.replace(tmp, progress)  # atomic: a preempted step never leaves a half-written count
            while start == 0 and count == hold_at:  # only the fresh run holds; the requeued one runs through
                time.sleep(0.1)
        return start

    def checkpoint(self, progress: Path, total: int, hold_at: int) -> submitit.helpers.DelayedSubmission:
        # a preemption (submitit_compat.interrupt) sends SIGTERM then USR2, but slurmctld forwards each from its own
        # thread, so SIGTERM may land after USR2 and kill `scontrol requeue` mid-flight. Wait until this process has
        # had its SIGTERM (submitit's handler ignores it): from then on the requeue cannot be hit by it.
        wait_for(lambda: bool(SIGTERMS), 300, "the SIGTERM of the preemption")
        return super().checkpoint(progress, total, hold_at)


def make_executor(folder: Path, cluster: SlurmCluster, **params) -> submitit.SlurmExecutor:
    """SlurmExecutor chosen explicitly: AutoExecutor would pick SLURM whenever srun is on PATH."""
    executor = submitit.SlurmExecutor(folder=folder / "%j")
    # time >= 60: submitit takes USR2 as a timeout, not a preemption, when the time limit is short
    executor.update_parameters(
        partition=cluster.partition, time=60, nodes=1, ntasks_per_node=1, cpus_per_task=1,
        additional_parameters={"chdir": str(REPO)},  # the pickled functions import from tests/
    )
    executor.update_parameters(**params)
    return executor


def read_count(progress: Path) -> int:
    return int(progress.read_text()) if progress.exists() else 0


def test_two_task_job_returns_both_ranks(slurm_cluster: SlurmCluster, tmp_path: Path):
    job = make_executor(tmp_path, slurm_cluster, ntasks_per_node=2).submit(rank_and_size)
    wait_for(job.done, 600, f"job {job.job_id} to finish")
    assert job.results() == [(0, 2), (1, 2)]


def test_scancel_is_seen_as_cancelled(slurm_cluster: SlurmCluster, tmp_path: Path):
    job = make_executor(tmp_path, slurm_cluster).submit(time.sleep, 300)
    wait_for(lambda: job.watcher.get_state(job.job_id, mode="force") == "RUNNING", 600, "the job to run")
    subprocess.run(["scancel", job.job_id], check=True)
    wait_for(lambda: job.done(force_check=True), 600, "the cancel to reach sacct")

    sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job.job_id],
                           capture_output=True, text=True, check=True)
    assert sacct.stdout.startswith("CANCELLED")
    assert job.state.startswith("CANCELLED")
    submitit_compat.expect_no_result(job)  # no result file will come: skip submitit's wait for slow file systems
    with pytest.raises(UncompletedJobError, match="CANCELLED"):
        job.result()


def test_interrupted_job_resumes_from_saved_progress(slurm_cluster: SlurmCluster, tmp_path: Path):
    progress, total, hold_at = tmp_path / "progress", 10, 3
    job = make_executor(tmp_path, slurm_cluster).submit(Counter(), progress, total, hold_at)
    wait_for(lambda: read_count(progress) == hold_at, 600, "the first run to reach its hold")
    submitit_compat.interrupt(job)  # preemption: SIGTERM then USR2, as SLURM does
    wait_for(job.done, 600, "the requeued run to finish")

    assert job.result() == hold_at  # resumed from the saved count, not from zero
    starts = [int(s) for s in (tmp_path / "starts").read_text().split()]
    assert starts == [0, hold_at]  # ran twice: fresh, then requeued
    assert read_count(progress) == total


def test_unknown_partition_fails_at_submission(slurm_cluster: SlurmCluster, tmp_path: Path):
    executor = make_executor(tmp_path, slurm_cluster, partition="no_such_partition")
    with pytest.raises(FailedJobError, match="(?i)invalid partition"):
        executor.submit(rank_and_size)
