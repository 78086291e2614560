"""Run a stage's work here (local) or as a SLURM job through submitit, and DDP set-up inside the job.

A DVC stage calls `run(p, name, fn, *args)`: it blocks until the work ends, streams rank 0's log,
records the job id in logs/slurm/<name>/job.json, re-attaches to that job if `dvc repro` was killed
while it ran, and turns a failed or cancelled job into an error with the id, the state and the tail of
its error log. Inside the job, `init_distributed()` derives rank, world size and the rendezvous from
the SLURM environment.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit
import torch
import torch.distributed as dist

from pipeline.compat import submitit as submitit_compat
from pipeline.config import Params

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN"}


class JobFailed(RuntimeError):
    """A SLURM job of a stage did not complete: the message has its id, state and error-log tail."""


def local_device() -> torch.device:
    """The device a single-process job trains on: the (first visible) GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device) of this process; sets up the process group in a multi-task SLURM job.

    The rendezvous is the first node of the job's node list (where SLURM puts rank 0) on a port derived from
    the job id, so concurrent jobs on one node do not collide. Both are set from the job, never inherited:
    sbatch exports the submitting shell's environment, whose MASTER_ADDR would name another machine. The local
    rank (the GPU) is SLURM_LOCALID. NCCL on GPUs, gloo on CPU."""
    if "SLURM_JOB_ID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) == 1:
        return 0, 1, local_device()
    env = submitit.JobEnvironment()
    os.environ["MASTER_ADDR"] = master_addr(env.hostnames)
    os.environ["MASTER_PORT"] = str(20000 + int(env.job_id.split("_")[0]) % 20000)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device, backend = torch.device("cuda", env.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=env.global_rank, world_size=env.num_tasks)
    return env.global_rank, env.num_tasks, device


def master_addr(hostnames: list[str]) -> str:
    """The rendezvous host: the job's first node, which must resolve here (one-line error naming it if not)."""
    host = hostnames[0]
    try:
        socket.getaddrinfo(host, None)
    except OSError as e:
        raise RuntimeError(f"launch: MASTER_ADDR {host!r} (first node of SLURM_JOB_NODELIST="
                           f"{os.environ.get('SLURM_JOB_NODELIST')}) does not resolve on node "
                           f"{node_name()}: {e}") from None
    return host


def node_name() -> str:
    """This task's SLURM node (SLURMD_NODENAME): nodes may share a hostname, as several slurmd on one host do."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


class PreemptionFlag:
    """Turns SLURM's preemption / time-limit signal into a flag the training loop checks between steps.

    submitit's own handler would requeue at once, wherever the loop is; instead the loop finishes its
    step, writes a checkpoint, then calls `requeue()`, which hands over to submitit's handler."""

    def __init__(self):
        self.signum: int | None = None
        self._submitit_handler = None
        if "SLURM_JOB_ID" in os.environ:
            sig = submitit_compat.preemption_signal()  # USR2 unless SUBMITIT_PREEMPT_SIGNAL
            self._submitit_handler = signal.getsignal(sig)
            signal.signal(sig, self._set)

    def _set(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def is_set(self) -> bool:
        """True on every rank if any rank was signalled."""
        flag = torch.tensor([int(self.signum is not None)])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def requeue(self) -> None:
        """Hand over to submitit: rank 0 requeues the job and exits; other ranks wait to be stopped."""
        if callable(self._submitit_handler):
            self._submitit_handler(self.signum or signal.SIGUSR2, None)
        while True:  # non-zero ranks: SLURM ends the step when the job is requeued
            time.sleep(1)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the work in progress was saved; the message says where a re-run resumes."""


class InterruptFlag:
    """Turns the first Ctrl-C (SIGINT) into a flag the training loop checks between steps, so that it can save
    a checkpoint and stop with one line rather than a traceback; a second Ctrl-C stops at once. Only in an
    interactive run's main thread: a SLURM job never gets the terminal's SIGINT."""

    def __init__(self):
        self.set = False
        self._old = None
        if "SLURM_JOB_ID" not in os.environ and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._set)

    def _set(self, signum: int, frame: Any) -> None:
        self.set = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt now

    def close(self) -> None:
        """Give SIGINT back to the handler it had before."""
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


class _Task(submitit.helpers.Checkpointable):
    """The submitted callable; checkpointable so that a timed-out job is requeued too (the work itself
    resumes from the stage's own checkpoint)."""

    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args = fn, args

    def __call__(self) -> Any:
        return self.fn(*self.args)


def _executor(p: Params, folder: Path, single_task: bool) -> submitit.SlurmExecutor:
    lp = p.launch
    ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=lp.max_requeues)
    extra = {"open_mode": "append"} | dict(lp.extra_sbatch)  # a requeued attempt appends to the same log
    for key in ("account", "qos", "constraint"):
        if getattr(lp, key):
            extra[key] = getattr(lp, key)
    ex.update_parameters(
        partition=lp.partition or None, nodes=1 if single_task else lp.nodes,
        ntasks_per_node=1 if single_task else lp.tasks_per_node, cpus_per_task=lp.cpus_per_task,
        gpus_per_node=(min(lp.gpus_per_node, 1) if single_task else lp.gpus_per_node) or None, mem=f"{lp.mem_gb}GB",
        time=lp.timeout_min, signal_delay_s=lp.signal_delay_s, job_name=folder.name,
        setup=list(lp.setup),  # lines of the sbatch script before srun: environment set-up on the node
        additional_parameters=extra,
    )
    return ex


def _state(job_id: str) -> str:
    """The job's state from the scheduler (squeue while active, else accounting)."""
    r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.split()[0]
    r = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    return r.stdout.split()[0].split()[0] if r.stdout.strip() else "UNKNOWN"


def usage(job_id: str) -> dict:
    """Elapsed hours and GPU-hours of a finished job, from SLURM accounting."""
    r = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "ElapsedRaw,AllocTRES"],
                       capture_output=True, text=True)
    seconds, gpus = 0, 0
    for line in r.stdout.strip().splitlines():
        elapsed, tres = (line.split("|") + [""])[:2]
        seconds = max(seconds, int(elapsed or 0))
        m = re.search(r"gres/gpu=(\d+)", tres)
        gpus = max(gpus, int(m.group(1)) if m else 0)
    return {"hours": round(seconds / 3600, 4), "gpu_hours": round(seconds * gpus / 3600, 4)}


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no log at {path})"


def _wait(job: submitit.Job, poll_s: float) -> None:
    """Block until the job ends, printing rank 0's new log lines and each state change."""
    stdout, seen, last_state = Path(job.paths.stdout), 0, None
    while True:
        state = _state(job.job_id)
        if state != last_state:
            print(f"launch: job {job.job_id} {state}", flush=True)
            last_state = state
        if stdout.exists():
            text = stdout.read_text(errors="replace")
            seen = 0 if len(text) < seen else seen  # the log was restarted
            if len(text) > seen:
                sys.stdout.write(text[seen:])
                sys.stdout.flush()
                seen = len(text)
        if state not in ACTIVE or (state == "UNKNOWN" and Path(job.paths.result_pickle).exists()):
            return  # (UNKNOWN: a cluster without accounting once the job left the queue)
        time.sleep(poll_s)


def run(p: Params, name: str, fn: Callable, *args: Any, identity: str = "", single_task: bool = False,
        poll_s: float = 3.0) -> tuple[Any, dict]:
    """fn(*args) in this process (launch.executor local) or as a SLURM job; returns (result, job info).

    identity: what makes a recorded job the same work (a params hash): only such a job is re-attached.
    single_task: one process with at most one GPU (evaluation), whatever the DDP layout in params."""
    if p.launch.executor == "local":
        t0 = time.time()
        return fn(*args), {"executor": "local", "hours": round((time.time() - t0) / 3600, 4), "gpu_hours": 0.0}

    folder = Path("logs/slurm") / name
    record = folder / "job.json"
    job = None
    if record.is_file():
        old = json.loads(record.read_text())
        state = _state(old["job_id"])
        if old.get("identity") == identity and (state in ACTIVE or state == "COMPLETED"):
            print(f"launch: re-attaching to job {old['job_id']} ({state}) recorded in {record}", flush=True)
            job = submitit.SlurmJob(folder=str(folder), job_id=old["job_id"], tasks=tuple(range(old["tasks"])))
    if job is None:
        ex = _executor(p, folder, single_task)
        try:
            job = ex.submit(_Task(fn, args))
        except subprocess.CalledProcessError as e:
            msg = (e.output or b"").decode(errors="replace").strip() if isinstance(e.output, bytes) else str(e.output)
            raise JobFailed(f"{name}: sbatch refused the job: {msg or e}") from None
        except Exception as e:  # submitit wraps sbatch errors in its own exception types
            raise JobFailed(f"{name}: sbatch refused the job: {e}") from None
        tasks = 1 if single_task else p.launch.nodes * p.launch.tasks_per_node
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"job_id": job.job_id, "identity": identity, "tasks": tasks}) + "\n")
        print(f"launch: submitted job {job.job_id} ({tasks} task(s)); logs in {folder}", flush=True)

    _wait(job, poll_s)
    state = _state(job.job_id)
    try:
        results = job.results()
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise JobFailed(f"{name}: job {job.job_id} ended {state}: {reason}\n"
                        f"--- tail of {job.paths.stderr} ---\n{_tail(Path(job.paths.stderr))}") from None
    return results[0], {"executor": "slurm", "job_id": job.job_id, "state": state, **usage(job.job_id)}
