"""The real stages under the real DVC on tiny data: repro, metrics, selective re-runs, resume after a kill."""

import json
import shutil
import signal
import subprocess
import sys
import time

import torch

from tests.conftest import make_project, run


def test_dvc_repro_runs_every_stage_and_only_reruns_what_changed(project):
    path, set_params = project
    run(["dvc", "repro"], path)
    for name in ("ffcv", "pretrain", "lineval", "knn", "voc", "coco"):
        assert (path / "metrics" / f"{name}.json").is_file(), name
    folders = sorted(d.name for d in (path / "data/toy/train").iterdir())
    assert (path / "data/ffcv/classes.txt").read_text().splitlines() == folders and len(folders) == 3  # label i
    lineval = json.loads((path / "metrics/lineval.json").read_text())
    knn = json.loads((path / "metrics/knn.json").read_text())
    assert 0 <= lineval["top1"] <= 100 and lineval["top1"] <= lineval["top5"]
    assert lineval["backbone_unchanged"] is True
    assert {"top1", "random_init_top1", "gain"} <= set(knn)
    pretrain = json.loads((path / "metrics/pretrain.json").read_text())
    assert pretrain["steps"] == 2 * (3 * 16 // 8)  # 2 epochs of 6 full batches
    shown = run(["dvc", "metrics", "show", "--json"], path).stdout
    assert "top1" in shown
    head = run(["git", "rev-parse", "HEAD"], path).stdout.strip()
    for name in ("ffcv", "pretrain", "lineval", "knn", "voc", "coco"):  # what produced each output
        prov = json.loads((path / "metrics" / f"{name}.json").read_text())["provenance"]
        assert prov["git_commit"] == head and prov["world_size"] == 1 and len(prov["params_hash"]) == 16, name
        assert prov["versions"]["torch"].startswith("2.") and prov["versions"]["ffcv"] != "not installed", name
    assert torch.load(path / "models/pretrain/checkpoint.pt", weights_only=True)["provenance"]["seed"] == 0
    exported = torch.load(path / "models/pretrain/backbone_torchvision.pt", weights_only=True)  # the export stage
    assert "layer4.1.bn2.running_var" in exported and not any(k.startswith("fc.") for k in exported)
    kept = sorted(p.name for p in (path / "checkpoints/pretrain").glob("epoch_*.pt"))
    assert kept == ["epoch_0001.pt", "epoch_0002.pt"]  # pretrain.keep_every: 1 in the tiny params
    assert torch.load(path / "checkpoints/pretrain/epoch_0001.pt", weights_only=True)["epoch"] == 1

    set_params({"lineval": {"epochs": 3}})
    out = run(["dvc", "repro"], path).stdout
    assert "Running stage 'lineval'" in out
    for stage in ("toy_data", "ffcv_convert", "pretrain", "knn"):
        assert f"Running stage '{stage}'" not in out, out


def _strip_run_details(metrics: dict) -> dict:
    """A metrics file without what differs between two runs of the same computation (where, when, how fast)."""
    return {k: v for k, v in metrics.items() if k not in ("provenance", "job", "seconds", "images_per_s")}


def test_two_fresh_clones_compute_the_same_metrics_on_cpu(tmp_path):
    """dvc repro -f (computed again, not restored from a cache) in two separate projects, same params and seed."""
    results = []
    for name in ("a", "b"):
        path, _ = make_project(tmp_path / name)
        run(["dvc", "repro", "-f", "knn", "lineval"], path)
        results.append({stage: _strip_run_details(json.loads((path / f"metrics/{stage}.json").read_text()))
                        for stage in ("ffcv", "pretrain", "lineval", "knn")})
        results[-1]["weights"] = torch.load(path / "models/pretrain/checkpoint.pt", weights_only=True)["model"]
    a, b = results
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    for stage in ("ffcv", "pretrain", "lineval", "knn"):
        assert a[stage] == b[stage], stage
    assert a["pretrain"]["steps"] > 0 and 0 < a["knn"]["top1"] <= 100


def test_hard_negative_methods_run_as_dvc_experiments_and_compare(project):
    path, set_params = project
    run(["dvc", "repro", "knn"], path)
    run(["git", "add", "-A"], path)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "moco baseline"], path)
    for method in ("mochi", "synco"):
        out = run(["dvc", "exp", "run", "-n", method, "-S", f"pretrain.method={method}",  # up to knn: no detection
                   "-S", "pretrain.hard_start_epoch=2", "knn"], path).stdout
        assert "Running stage 'pretrain'" in out
    shown = json.loads(run(["dvc", "exp", "show", "--json"], path).stdout)
    assert "mochi" in json.dumps(shown) and "synco" in json.dumps(shown)
    diff = run(["dvc", "metrics", "diff", "HEAD", "mochi", "--json"], path).stdout
    assert "metrics/knn.json" in diff and "metrics/pretrain.json" in diff
    plots = run(["dvc", "plots", "diff", "HEAD", "synco", "--json"], path).stdout
    assert "hardness" in plots
    sources = (path / "analysis/pretrain/synthetic_sources.csv").read_text()  # the synco run, in the workspace
    assert "SynCo 1 interpolated" in sources and "SynCo 6 adversarial" in sources


def test_killed_pretraining_resumes_from_the_saved_step(project):
    path, set_params = project
    set_params({"pretrain": {"epochs": 4}})
    run(["dvc", "repro", "ffcv_convert"], path)
    state = path / "checkpoints/pretrain/last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={"PYTHONPATH": str(path), "PATH": "/usr/bin:/bin"})
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # mid-training, after at least one complete epoch
    proc.wait()
    assert state.exists(), proc.stdout.read()

    saved = torch.load(state, weights_only=True)
    assert saved["batch"] == 0 and saved["step"] == saved["epoch"] * 6
    assert 1 <= saved["epoch"] < 4, "the kill came too late to test a resume"

    out = run([sys.executable, "-m", "stages.pretrain"], path).stdout
    e = saved["epoch"]
    assert f"resuming {state} at epoch {e + 1} batch 0 (step {saved['step']})" in out
    assert f"pretrain: epoch {e}/4 loss" not in out  # the saved epoch is not trained again
    assert f"pretrain: epoch {e + 1}/4 loss" in out
    final = json.loads((path / "metrics/pretrain.json").read_text())
    assert final["steps"] == 4 * 6

    # on CPU the resumed run ends exactly where an uninterrupted one does: same weights, queue, metrics
    resumed = torch.load(path / "models/pretrain/checkpoint.pt", weights_only=True)
    shutil.rmtree(path / "checkpoints/pretrain")
    run([sys.executable, "-m", "stages.pretrain"], path)
    straight = torch.load(path / "models/pretrain/checkpoint.pt", weights_only=True)
    assert resumed["model"].keys() == straight["model"].keys()
    differ = [k for k in straight["model"] if not torch.equal(resumed["model"][k], straight["model"][k])]
    assert not differ, f"resumed and uninterrupted runs differ in {differ[:5]}"
    assert json.loads((path / "metrics/pretrain.json").read_text())["loss"] == final["loss"]

    # the same code continues the finished run (nothing left to train); after a change to the stage's code it
    # starts afresh: dvc repro must not record the old run's weights under the new code
    assert f"resuming {state} at epoch 5" in run([sys.executable, "-m", "stages.pretrain"], path).stdout
    with open(path / "pipeline/analysis.py", "a") as f:
        f.write("\n# edited\n")
    out = run([sys.executable, "-m", "stages.pretrain"], path).stdout
    assert "belongs to other params, code or data; starting from scratch" in out and "resuming" not in out
