"""The stages as SLURM jobs on the real one-node cluster (no mocks): 2-task DDP pretraining and detection,
preemption and requeue, re-attaching after a killed `dvc repro`, cancelled jobs, bad settings, sweeps."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import results, run, wait_for

SLURM = {"launch": {"executor": "slurm", "profile": "local-test"}}
HANG = 3600  # s: the timeouts below only end a hang; on a shared 2-core machine the whole tiny study took > 900 s


def start_repro(path: Path, *stages: str) -> subprocess.Popen:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(path))
    return subprocess.Popen(["dvc", "repro", *stages], cwd=path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def job_id(path: Path) -> str:
    return json.loads((path / "logs/slurm/pretrain/job.json").read_text())["job_id"]


def submit_pretrain(project, epochs: int) -> tuple[Path, subprocess.Popen, str]:
    """Convert the data, start `dvc repro pretrain` on the cluster in the background, return once the
    job is recorded: (project path, the dvc process, the job id)."""
    path, set_params = project
    set_params(SLURM | {"pretrain": {"epochs": epochs}})
    run(["dvc", "repro", "ffcv_convert"], path)
    proc = start_repro(path, "pretrain")
    wait_for(lambda: (path / "logs/slurm/pretrain/job.json").exists(), HANG, "the job record")
    return path, proc, job_id(path)


def test_dvc_repro_runs_two_task_ddp_pretraining_and_evaluation_on_slurm(project, slurm_cluster):
    path, set_params = project
    set_params(SLURM)
    run(["dvc", "repro"], path, timeout=HANG)
    for stage in ("lineval", "knn"):  # one-task jobs through the same launcher
        job = json.loads((path / f"metrics/{stage}.run.json").read_text())["job"]
        assert job["executor"] == "slurm" and job["state"] == "COMPLETED", stage
    for task in ("voc", "coco"):  # detectron2 fine-tuning as 2-task DDP jobs (gloo, naiveSyncBN)
        m = json.loads((path / f"metrics/{task}.json").read_text()) | json.loads(
            (path / f"metrics/{task}.run.json").read_text())  # numbers, and the job beside them
        assert m["world_size"] == 2 and m["job"]["state"] == "COMPLETED" and 0 <= m["bbox"]["AP50"] <= 100, task
    metrics = json.loads((path / "metrics/pretrain.json").read_text()) | json.loads(
        (path / "metrics/pretrain.run.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["job"]["executor"] == "slurm" and metrics["job"]["state"] == "COMPLETED"
    assert metrics["job"]["job_id"] == job_id(path)
    assert metrics["steps"] == 2 * (3 * 16 // 16)  # global batch 2 x 8: 3 steps per epoch
    ckpt = torch.load(path / "models/pretrain/checkpoint.pt", weights_only=True)
    assert ckpt["arch"] == "resnet18" and ckpt["step"] == metrics["steps"]


def test_preempted_job_saves_mid_epoch_and_resumes_from_that_step(project, slurm_cluster):
    path, proc, jid = submit_pretrain(project, epochs=6)
    log = path / "logs/slurm/pretrain"
    wait_for(lambda: "pretrain: epoch 1/6" in "".join(p.read_text() for p in log.glob(f"{jid}_0_log.out")),
             HANG, "the first epoch")
    subprocess.check_call(["scancel", jid, "--signal", "USR2"])  # what SLURM sends before preemption
    out, _ = proc.communicate(timeout=HANG)
    assert proc.returncode == 0, out
    saved = [line for line in out.splitlines() if "preempted; saved" in line]
    assert saved, out
    step = saved[0].split("(step ")[1].split(")")[0]
    resumed = [line for line in out.splitlines() if "resuming" in line]
    assert resumed and resumed[0].endswith(f"(step {step})"), out  # the requeued attempt starts at the saved step
    metrics = json.loads((path / "metrics/pretrain.json").read_text()) | json.loads(
        (path / "metrics/pretrain.run.json").read_text())
    assert metrics["steps"] == 6 * 3 and metrics["job"]["job_id"] == jid  # same job, requeued


def test_killed_dvc_repro_reattaches_to_the_running_job(project, slurm_cluster):
    path, proc, jid = submit_pretrain(project, epochs=3)
    os.killpg(proc.pid, signal.SIGKILL)  # the terminal dies; the job keeps running
    proc.wait()
    (path / ".dvc/tmp/rwlock").unlink(missing_ok=True)
    out = run(["dvc", "repro", "pretrain"], path, timeout=HANG).stdout
    assert f"re-attaching to job {jid}" in out
    assert "submitted job" not in out
    assert json.loads((path / "metrics/pretrain.run.json").read_text())["job"]["job_id"] == jid


def test_cancelled_job_fails_the_stage_with_id_and_state(project, slurm_cluster):
    _, proc, jid = submit_pretrain(project, epochs=20)
    subprocess.check_call(["scancel", jid])
    out, _ = proc.communicate(timeout=HANG)
    assert proc.returncode != 0
    assert f"job {jid} ended CANCELLED" in out and "Traceback" not in out, out


@pytest.mark.parametrize("setting, message", [({"partition": "nope"}, "invalid partition")])
def test_bad_slurm_setting_fails_fast_with_slurms_message(project, slurm_cluster, setting, message):
    path, set_params = project
    set_params({"launch": SLURM["launch"] | setting})
    run(["dvc", "repro", "ffcv_convert"], path)
    r = run(["dvc", "repro", "pretrain"], path, check=False, timeout=HANG)
    assert r.returncode != 0
    assert "sbatch refused the job" in r.stderr and message in r.stderr.lower(), r.stderr
    # fails at submission, not after waiting on a job: no job was recorded, none was waited for
    assert not (path / "logs/slurm/pretrain/job.json").exists()
    assert "submitted job" not in r.stdout and "launch: job" not in r.stdout, r.stdout


def test_queued_sweep_runs_as_parallel_cluster_jobs(project, slurm_cluster):
    path, set_params = project
    set_params(SLURM | {"pretrain": {"epochs": 2}})
    run(["dvc", "repro", "ffcv_convert"], path)
    run(["git", "add", "-A"], path)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "converted data"], path)
    for seed in (1, 2):
        run(["dvc", "exp", "run", "--queue", "-n", f"seed{seed}", "-S", f"pretrain.seed={seed}", "pretrain"], path)
    run(["dvc", "queue", "start", "-j", "2"], path)

    def finished() -> bool:
        status = run(["dvc", "queue", "status"], path).stdout
        return "Queued" not in status and "Running" not in status

    wait_for(finished, HANG, "the queued experiments")
    status = run(["dvc", "queue", "status"], path).stdout
    assert status.count("Success") == 2, status
    # each experiment's job is in its run record (not a metric, so not in `dvc exp show`): read it from the
    # experiment's git ref
    refs = run(["git", "for-each-ref", "refs/exps", "--format=%(objectname)"], path).stdout.split()
    records = [run(["git", "show", f"{ref}:metrics/pretrain.run.json"], path).stdout for ref in refs]
    jobs = sorted(set(re.findall(r'"job_id": "(\d+)"', "".join(records))))
    assert len(jobs) == 2, records
    spans = [line.split("|") for line in subprocess.check_output(
        ["sacct", "-n", "-X", "-P", "-j", ",".join(jobs), "-o", "Start,End"], text=True).split()]
    (s1, e1), (s2, e2) = spans
    assert s1 < e2 and s2 < e1, f"the two jobs did not overlap: {spans}"  # ISO timestamps compare as text


def test_semisup_runs_as_a_one_task_slurm_job(project, slurm_cluster):
    path, set_params = project
    run(["dvc", "repro", "pretrain"], path)
    set_params(SLURM)
    out = run(["python", "-m", "stages.semisup"], path, timeout=900).stdout
    assert "submitted job" in out and "semisup 50pct: top-1" in out, out
    m = results(path, "semisup")
    assert m["job"]["executor"] == "slurm" and m["job"]["state"] == "COMPLETED"
    assert set(m["fractions"]) == {"25pct", "50pct"} and m["device"] == "cpu"
