"""Multi-node jobs on the real two-node test cluster (slurm/local-cluster: two slurmd daemons on this host,
hncl-n1 and hncl-n2, each with its own hostname and node-local TMPDIR): rendezvous across nodes, two-node
DDP pretraining equal to the one-node run, node-local staging, preemption and requeue, detection."""

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import submitit
import torch
import torch.distributed as dist

from pipeline.launch import init_distributed, master_addr
from pipeline.train.pretrain import stage_to_scratch
from tests.conftest import make_project, results, run, wait_for
from tests.slurm_fixture import SlurmCluster

REPO = Path(__file__).resolve().parents[1]
NODES = ("hncl-n1", "hncl-n2")


def where_am_i() -> dict:
    """Runs as each task: what it sees of its node, and a gloo all_reduce over the job's ranks."""
    rank, world, _ = init_distributed()
    total = torch.tensor([rank + 1])
    dist.all_reduce(total)
    out = {"rank": rank, "world": world, "node_id": os.environ["SLURM_NODEID"],
           "local_rank": os.environ["SLURM_LOCALID"], "node": os.environ["SLURMD_NODENAME"],
           "hostname": socket.gethostname(), "tmpdir": os.environ.get("TMPDIR"),
           "master": os.environ["MASTER_ADDR"], "sum": int(total.item())}
    dist.destroy_process_group()
    return out


def test_two_by_two_job_spans_both_nodes_and_reduces_across_them(slurm_cluster: SlurmCluster, tmp_path: Path):
    ex = submitit.SlurmExecutor(folder=tmp_path / "%j")
    ex.update_parameters(partition=slurm_cluster.partition, time=60, nodes=2, ntasks_per_node=2, cpus_per_task=1,
                         additional_parameters={"chdir": str(REPO)})
    job = ex.submit(where_am_i)
    wait_for(job.done, 300, f"job {job.job_id}")
    seen = job.results()
    assert [s["rank"] for s in seen] == [0, 1, 2, 3] and {s["world"] for s in seen} == {4}
    assert {s["sum"] for s in seen} == {1 + 2 + 3 + 4}  # the all_reduce crossed the nodes
    by_node = {(s["node_id"], s["node"], s["hostname"], s["tmpdir"]) for s in seen}
    assert by_node == {(str(i), n, n, str(slurm_cluster.state_dir / "scratch" / n)) for i, n in enumerate(NODES)}
    assert sorted((s["node"], s["local_rank"]) for s in seen) == [(n, str(r)) for n in NODES for r in (0, 1)]
    assert {s["master"] for s in seen} == {NODES[0]}  # rank 0's node, which resolved on both


def test_unresolvable_first_node_and_unset_scratch_variable_fail_with_one_line(tmp_path: Path, monkeypatch):
    with pytest.raises(RuntimeError, match=r"MASTER_ADDR 'no-such-node.invalid' .* does not resolve on node"):
        master_addr(["no-such-node.invalid", "localhost"])
    assert master_addr(["localhost", "no-such-node.invalid"]) == "localhost"
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"x")
    monkeypatch.delenv("HNCL_NO_SUCH_VAR", raising=False)
    with pytest.raises(ValueError, match=r"launch.local_scratch = '\$HNCL_NO_SUCH_VAR/b': .* not set on node"):
        stage_to_scratch([beton], "$HNCL_NO_SUCH_VAR/b", 0)
    assert not (Path.cwd() / "$HNCL_NO_SUCH_VAR").exists()


def start_repro(path: Path, *stages: str) -> subprocess.Popen:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(path))
    return subprocess.Popen(["dvc", "repro", *stages], cwd=path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


def job_of(path: Path, stage: str) -> str:
    return json.loads((path / f"logs/slurm/{stage}/job.json").read_text())["job_id"]


def task_logs(path: Path, stage: str) -> list[str]:
    """Each task's log of the stage's job (task 0 first); a requeued attempt appends to the same files."""
    jid = job_of(path, stage)
    return [(path / f"logs/slurm/{stage}/{jid}_{t}_log.out").read_text() for t in (0, 1)]


def node_list(jid: str) -> str:
    return subprocess.check_output(["sacct", "-n", "-X", "-P", "-j", jid, "-o", "NodeList"], text=True).split()[0]


def launch_params(nodes: int, tasks_per_node: int, scratch: str = "") -> dict:
    return {"launch": {"executor": "slurm", "profile": "local-test", "nodes": nodes, "tasks_per_node": tasks_per_node,
                       "local_scratch": scratch}}


def test_two_node_pretraining_equals_one_node_and_stages_once_per_node(slurm_cluster: SlurmCluster, tmp_path: Path,
                                                                       request: pytest.FixtureRequest):
    """`dvc repro` of pretrain as a 2 x 1 job and as a 1 x 2 job (same global batch): the same weights, bit
    for bit; then detection as a two-node job on the two-node weights."""
    scratch = f"hncl-betons-{uuid.uuid4().hex}"  # a fresh folder in each node's TMPDIR (it outlives tmp_path)
    for node in NODES:
        request.addfinalizer(lambda node=node: shutil.rmtree(slurm_cluster.state_dir / "scratch" / node / scratch,
                                                            ignore_errors=True))
    two, set_two = make_project(tmp_path / "two-nodes")
    one, set_one = make_project(tmp_path / "one-node")
    set_two(launch_params(2, 1, f"$TMPDIR/{scratch}"))
    set_one(launch_params(1, 2))
    for path in (two, one):
        run(["dvc", "repro", "ffcv_convert"], path)
    procs = [start_repro(path, "pretrain") for path in (two, one)]  # both jobs at once: the cluster has the cores
    finish(procs[0]), finish(procs[1])

    for path, nodes in ((two, {"hncl-n[1-2]"}), (one, set(NODES))):
        m = results(path, "pretrain")
        assert m["world_size"] == 2 and m["job"]["state"] == "COMPLETED"
        assert node_list(m["job"]["job_id"]) in nodes
    a = torch.load(two / "models/pretrain/checkpoint.pt", weights_only=True)["model"]
    b = torch.load(one / "models/pretrain/checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    differ = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"two-node weights differ from the one-node run's: {differ}"

    logs = task_logs(two, "pretrain")
    for rank, (node, log) in enumerate(zip(NODES, logs, strict=True)):
        node_scratch = slurm_cluster.state_dir / "scratch" / node / scratch
        staged = [line for line in log.splitlines() if line.startswith("pretrain: staged")]
        assert len(staged) == 2 and all(line.endswith(f"on node {node}") for line in staged), log  # train, val
        assert sorted(f.name.split("-")[0] for f in node_scratch.iterdir()) == ["train", "val"]
        reads = [line for line in log.splitlines() if line.startswith(f"pretrain: rank {rank} on node {node} "
                                                                       f"(SLURM_NODEID {rank}) reads")]
        assert len(reads) == 1 and reads[0].count(str(node_scratch)) == 2, log  # its own node's copies
    # rank 0 alone returns the metrics (rank 1 returns None) and writes checkpoints
    job = submitit.SlurmJob(folder=two / "logs/slurm/pretrain", job_id=job_of(two, "pretrain"), tasks=(0, 1))
    returned = job.results()
    assert returned[0]["steps"] == 6 and returned[1] is None
    assert sorted(f.name for f in (two / "checkpoints/pretrain").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt",
                                                                               "last.pt"]

    out = finish(start_repro(two, "detect_voc"))
    m = results(two, "voc")
    assert m["world_size"] == 2 and m["job"]["state"] == "COMPLETED", out[-3000:]
    assert node_list(m["job"]["job_id"]) == "hncl-n[1-2]"
    assert 0 <= m["bbox"]["AP50"] <= 100


def test_preempted_two_node_job_checkpoints_once_and_resumes_on_both_nodes(slurm_cluster: SlurmCluster,
                                                                           tmp_path: Path):
    path, set_params = make_project(tmp_path)
    set_params(launch_params(2, 1) | {"pretrain": {"epochs": 4}})
    run(["dvc", "repro", "ffcv_convert"], path)
    proc = start_repro(path, "pretrain")
    wait_for(lambda: (path / "logs/slurm/pretrain/job.json").exists(), 120, "the job record")
    jid = job_of(path, "pretrain")
    log0 = path / f"logs/slurm/pretrain/{jid}_0_log.out"
    wait_for(lambda: log0.exists() and "pretrain: epoch 1/4" in log0.read_text(), 600, "the first epoch")
    subprocess.check_call(["scancel", jid, "--signal", "USR2"])  # to every task of the job, as SLURM does
    out = finish(proc)

    logs = task_logs(path, "pretrain")
    saved = [line for log in logs for line in log.splitlines() if "preempted; saved" in line]
    assert len(saved) == 1, logs[0]  # one checkpoint, by rank 0
    step = saved[0].split("(step ")[1].split(")")[0]
    for rank, (node, log) in enumerate(zip(NODES, logs, strict=True)):
        resumed = [line for line in log.splitlines() if line.startswith(f"pretrain: resuming (rank {rank} on node "
                                                                         f"{node})")]
        assert len(resumed) == 1 and resumed[0].endswith(f"(step {step})"), log
    m = results(path, "pretrain")
    assert m["steps"] == 4 * 3 and m["job"]["job_id"] == jid, out[-3000:]  # the same job, requeued
    assert node_list(jid) == "hncl-n[1-2]"
