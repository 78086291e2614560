"""The real stages under the real DVC on tiny data: repro, metrics, selective re-runs, resume after a kill."""

import csv
import json
import os
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
    assert "top1" in shown and "provenance" not in shown and "gpu_hours" not in shown and "versions" not in shown
    head = run(["git", "rev-parse", "HEAD"], path).stdout.strip()
    for name in ("ffcv", "pretrain", "lineval", "knn", "voc", "coco"):  # what produced each output, beside it
        metrics = json.loads((path / "metrics" / f"{name}.json").read_text())
        assert not {"provenance", "job"} & set(metrics) and len(metrics["params_hash"]) == 16, name
        assert not [k for k, v in metrics.items() if isinstance(v, str) and k != "params_hash"], name
        prov = json.loads((path / "metrics" / f"{name}.run.json").read_text())["provenance"]
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
    """MoCHi and SynCo as DVC experiments up to knn beside the MoCo v2 baseline, compared by DVC and by
    pipeline.compare; then a second MoCo seed, which must change the run."""
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

    # pipeline.compare on these real experiments, read through DVC's API
    run(["python", "-m", "pipeline.compare", "--no-run", "--exp", "mochi", "synco", "--baseline", "mochi"], path)
    md = (path / "reports/comparison.md").read_text()
    assert "| mochi | mochi | 0 | knn | " in md and "| kNN top-1 | " in md and "(n=1)" in md, md
    # a second seed must change the run (a seed that changed nothing would fake a zero std over seeds); kNN top-1
    # saturates on the tiny set, so the pretraining loss carries the check
    run(["dvc", "exp", "run", "-n", "moco-s1", "-S", "pretrain.seed=1", "pretrain"], path)
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD", "moco-s1", "--json"], path).stdout)
    assert diff["metrics/pretrain.json"]["loss"]["diff"] != 0, diff


def test_killed_pretraining_resumes_from_the_saved_step(project):
    """A SIGKILL at any moment after the first checkpoint leaves a checkpoint of a finished epoch, and a run resumed
    from such a checkpoint ends exactly where an uninterrupted one does. Nothing here depends on when the kill
    lands: the mid-run resume is also checked from a kept epoch checkpoint (pretrain.keep_every)."""
    path, set_params = project
    set_params({"pretrain": {"epochs": 4, "keep_every": 1}})
    run(["dvc", "repro", "ffcv_convert"], path)
    state, models = path / "checkpoints/pretrain/last.pt", path / "models/pretrain/checkpoint.pt"

    def pretrain_stage() -> str:
        return run([sys.executable, "-m", "stages.pretrain"], path).stdout

    # on CPU, uninterrupted: the reference weights, loss and one kept checkpoint per epoch
    pretrain_stage()
    straight = torch.load(models, weights_only=True)
    final_loss = json.loads((path / "metrics/pretrain.json").read_text())["loss"]
    epoch1 = torch.load(path / "checkpoints/pretrain/epoch_0001.pt", weights_only=True)
    assert (epoch1["epoch"], epoch1["batch"], epoch1["step"]) == (1, 0, 6)

    def assert_same_as_straight() -> None:
        resumed = torch.load(models, weights_only=True)
        assert resumed["model"].keys() == straight["model"].keys()
        differ = [k for k in straight["model"] if not torch.equal(resumed["model"][k], straight["model"][k])]
        assert not differ, f"resumed and uninterrupted runs differ in {differ[:5]}"
        assert json.loads((path / "metrics/pretrain.json").read_text())["loss"] == final_loss

    # a real SIGKILL once the first checkpoint exists (an event, however slow the machine)
    shutil.rmtree(path / "checkpoints/pretrain")
    models.unlink()
    proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={"PYTHONPATH": str(path), "PATH": "/usr/bin:/bin"})
    try:
        deadline = time.monotonic() + 900  # ends a hang only
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = torch.load(state, weights_only=True)  # whole, whatever the moment of the kill
    e = saved["epoch"]
    assert 1 <= e <= 4 and saved["batch"] == 0 and saved["step"] == e * 6
    out = pretrain_stage()
    assert f"resuming {state} at epoch {e + 1} batch 0 (step {saved['step']})" in out
    assert f"pretrain: epoch {e}/4 loss" not in out  # the saved epoch is not trained again
    assert_same_as_straight()

    # killed right after epoch 1, whatever the timing above: resume from the checkpoint epoch 1 left
    shutil.copyfile(path / "checkpoints/pretrain/epoch_0001.pt", state)
    models.unlink()
    out = pretrain_stage()
    assert f"resuming {state} at epoch 2 batch 0 (step 6)" in out
    assert "pretrain: epoch 1/4 loss" not in out and "pretrain: epoch 2/4 loss" in out
    assert json.loads((path / "metrics/pretrain.json").read_text())["steps"] == 4 * 6
    assert_same_as_straight()

    # the same code continues the finished run (nothing left to train); after a change to the stage's code it
    # starts afresh: dvc repro must not record the old run's weights under the new code
    assert f"resuming {state} at epoch 5" in pretrain_stage()
    with open(path / "pipeline/analysis.py", "a") as f:
        f.write("\n# edited\n")
    out = pretrain_stage()
    assert "belongs to other params, code or data; starting from scratch" in out and "resuming" not in out


def _curves(path) -> dict:
    """Every dvclive TSV of pretraining as {file: [(step, value), ...]} (timestamps dropped), and the analysis
    tables as text: what the plots show."""
    out = {}
    for tsv in sorted((path / "dvclive/pretrain/plots/metrics").rglob("*.tsv")):
        with tsv.open(newline="") as f:
            out[tsv.name] = [(r["step"], r[tsv.stem]) for r in csv.DictReader(f, delimiter="\t")]
    for table in sorted((path / "analysis/pretrain").glob("*.csv")):
        out[table.name] = table.read_text()
    return out


def test_ctrl_c_stops_with_one_line_and_the_resumed_curves_equal_an_uninterrupted_run(project):
    path, set_params = project
    set_params({"pretrain": {"epochs": 4, "analysis_every": 2}})
    run(["dvc", "repro", "ffcv_convert"], path)
    run([sys.executable, "-m", "stages.pretrain"], path)
    straight = _curves(path)
    straight_weights = torch.load(path / "models/pretrain/checkpoint.pt", weights_only=True)["model"]
    assert [s for s, _ in straight["loss.tsv"]] == ["0", "1", "2", "3"]  # dvclive step = epoch - 1
    assert [s for s, _ in straight["alignment.tsv"]] == ["1", "3"]  # analyses after epochs 2 and 4
    for folder in ("checkpoints/pretrain", "dvclive/pretrain", "analysis/pretrain", "models/pretrain"):
        shutil.rmtree(path / folder)

    env = dict(os.environ, PYTHONPATH=str(path))
    proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # the event: the first epoch is logged and checkpointed (the second has begun)
        if line.startswith("pretrain: epoch 1/4 loss"):
            break
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = [line for line in err.splitlines() if line.startswith("pretrain:")]
    assert len(last) == 1 and last[0].startswith("pretrain: interrupted; saved epoch "), err
    saved = torch.load(path / "checkpoints/pretrain/last.pt", weights_only=True)
    assert f"saved epoch {saved['epoch'] + 1} batch {saved['batch']} (step {saved['step']})" in last[0]
    assert "checkpoints/pretrain/last.pt; `dvc repro` resumes there" in last[0]
    assert 1 <= saved["epoch"] < 4, "the Ctrl-C came too late to test a resume"

    out = run([sys.executable, "-m", "stages.pretrain"], path).stdout
    state = path / "checkpoints/pretrain/last.pt"
    assert f"resuming {state} at epoch {saved['epoch'] + 1} batch {saved['batch']}" in out
    assert _curves(path) == straight  # curves, not only weights, as if never interrupted
    resumed = torch.load(path / "models/pretrain/checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], straight_weights[k]) for k in straight_weights)


def test_rows_logged_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    """Killed between logging an epoch and checkpointing it: that epoch is trained and logged again, once."""
    from pipeline.train.pretrain import trim_curves

    live, analysis = tmp_path / "dvclive", tmp_path / "analysis"
    (live / "plots/metrics/train").mkdir(parents=True)
    analysis.mkdir()
    tsv = live / "plots/metrics/train/loss.tsv"
    tsv.write_text("timestamp\tstep\tloss\n" + "".join(f"{100 + s}\t{s}\t{1.0 / (s + 1)}\n" for s in range(3)))
    table = analysis / "hardness.csv"
    table.write_text("rank,probability,epoch\n1,0.5,2\n2,0.25,2\n1,0.5,3\n")
    trim_curves(live, analysis, epochs_done=2)  # the checkpoint holds 2 finished epochs: steps 0, 1
    assert tsv.read_text() == "timestamp\tstep\tloss\n100\t0\t1.0\n101\t1\t0.5\n"
    assert table.read_text() == "rank,probability,epoch\n1,0.5,2\n2,0.25,2\n"
    trim_curves(live, analysis, epochs_done=2)
    assert tsv.read_text().count("\n") == 3  # nothing more to drop


def _baseline_files(path) -> dict:
    """What a failed experiment must not touch: params.yaml, the metrics and their records, the weights."""
    files = [path / "params.yaml", path / "models/pretrain/checkpoint.pt", *sorted((path / "metrics").glob("*.json"))]
    return {f.name: f.read_bytes() for f in files}


def test_experiments_never_lose_the_baseline_and_stale_numbers_are_named(project):
    path, set_params = project
    run(["dvc", "repro", "knn", "lineval"], path)  # the baseline
    run(["git", "add", "-A"], path)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "baseline"], path)
    baseline = _baseline_files(path)
    assert {"pretrain.json", "pretrain.run.json", "knn.json", "lineval.json"} <= set(baseline)

    # the documented default: dvc exp run --temp. A bad value fails in the validate stage with one line; the
    # workspace (params.yaml included) is exactly as it was
    bad = run(["dvc", "exp", "run", "--temp", "-S", "pretrain.queue_size=-5"], path, check=False)
    assert bad.returncode != 0
    assert "validate: error: params: pretrain.queue_size = -5 must be >= 1" in bad.stdout + bad.stderr
    assert "Running stage 'pretrain'" not in bad.stdout
    assert _baseline_files(path) == baseline
    assert run(["git", "status", "--porcelain"], path).stdout == ""

    # a plain dvc exp run in the workspace: validate fails before DVC removes another stage's outputs
    bad = run(["dvc", "exp", "run", "-S", "pretrain.queue_size=-5"], path, check=False)
    assert bad.returncode != 0 and "Running stage 'pretrain'" not in bad.stdout
    after = _baseline_files(path)
    assert {k: v for k, v in after.items() if k != "params.yaml"} == {
        k: v for k, v in baseline.items() if k != "params.yaml"}
    run(["git", "checkout", "params.yaml"], path)  # the README's way back: params, then validate alone re-runs
    out = run(["dvc", "repro", "knn", "lineval"], path).stdout
    assert "Running stage 'validate'" in out and "Running stage 'pretrain'" not in out, out
    assert _baseline_files(path) == baseline

    # a successful experiment: recorded, workspace untouched; its metrics columns are metrics
    run(["dvc", "exp", "run", "--temp", "-n", "k3", "-S", "knn.k=3", "knn"], path)
    assert _baseline_files(path) == baseline
    shown = run(["dvc", "exp", "show", "--csv"], path).stdout
    header = shown.splitlines()[0]
    assert "k3" in shown and "top1" in header and "provenance" not in header and "git_commit" not in header

    # an experiment that changes pretraining but runs up to knn only: lineval's numbers are the baseline's,
    # and the freshness check says so
    run(["dvc", "exp", "run", "-S", "pretrain.lr=0.06", "knn"], path)
    out = run([sys.executable, "-m", "pipeline.freshness"], path).stdout
    assert "metrics/knn.json: fresh" in out and "metrics/pretrain.json: fresh" in out
    assert "metrics/lineval.json: STALE" in out
