"""The report: method labels, the results table against hand-written metrics, figures from tiny curve files."""

from pathlib import Path

from PIL import Image

from pipeline.config import Params
from pipeline.report import PUBLISHED, method_label, results_markdown, results_table, write_figures

JOB = {"executor": "local", "hours": 0.1, "gpu_hours": 0.0}
PRETRAIN = {"method": "mochi", "epochs": 6, "steps": 300, "world_size": 1, "images_per_s": 38.1, "seconds": 504.1,
            "job": JOB}
LINEVAL = {"top1": 73.25, "top5": 99.0, "epochs": 30, "job": JOB}
KNN = {"top1": 68.75, "random_init_top1": 68.0, "gain": 0.75, "k": 20, "temperature": 0.07, "job": JOB}


def _ap(ap50: float, ap: float, ap75: float, std: float) -> dict:
    return {"AP50": ap50, "AP": ap, "AP75": ap75, "AP50_std": std, "AP_std": std, "AP75_std": std}


def _detection(task: str, trials: int) -> dict:
    kinds = ("bbox", "segm") if task == "coco" else ("bbox",)
    out = {kind: _ap(40.0 + i, 20.0 + i, 15.0 + i, 0.25) for i, kind in enumerate(kinds)}
    return out | {"trials": [{}] * trials, "task": task, "init": "pretrained", "iterations": 100, "classes": 4,
                  "world_size": 1, "job": {"executor": "slurm", "job_id": "42", "state": "COMPLETED", "hours": 0.5,
                                           "gpu_hours": 2.0}}


def _params(method: str = "moco", **pretrain) -> Params:
    p = Params()
    p.pretrain.method = method
    for k, v in pretrain.items():
        setattr(p.pretrain, k, v)
    return p


def test_method_labels():
    assert method_label(_params()) == "MoCo v2"
    assert method_label(_params("mochi")) == "MoCHi (16, 16, 8)"
    assert method_label(_params("synco")) == "SynCo (N=16; 6/6/6/2/2/2)"
    assert method_label(_params(loss="dcl")) == "MoCo v2 + DCL (tau+=0.1)"
    assert method_label(_params("mochi", loss="hcl", drop_hardest=0.001)) == \
        "MoCHi (16, 16, 8) + HCL (tau+=0.1, beta=1) + drop 0.1% hardest"


def test_table_has_our_row_then_the_published_rows():
    table = results_table(_params("mochi"), PRETRAIN, LINEVAL, KNN, _detection("voc", 1), _detection("coco", 1))
    rows = table.strip().splitlines()
    assert rows[0].startswith("| method | arch | epochs | linear top-1 | kNN top-1 (random init)")
    assert rows[2] == ("| **MoCHi (16, 16, 8)** (this run) | R-18 | 6 | 73.2 | 68.8 (68.0) "
                       "| 40.0 / 20.0 / 15.0 | 20.0 / 21.0 |  |")
    assert len(rows) == 3 + len(PUBLISHED)
    assert "| MoCo v2 † | R-50 | 200 | 67.5 |  | 82.4 / 57.0 / 63.6 |  |  |" in rows
    assert "| MoCHi (512, 1024, 512) † | R-50 | 1000 | 70.6 |  | 83.2 / 58.4 / 65.5 |  |  |" in rows


def test_table_shows_std_over_several_trials_and_marks_random_init():
    coco = _detection("coco", 1) | {"init": "random"}
    table = results_table(_params(), PRETRAIN, LINEVAL, KNN, _detection("voc", 5), coco)
    assert "| 40.0 ± 0.2 / 20.0 ± 0.2 / 15.0 ± 0.2 | 20.0 / 21.0 (random init) |" in table


def test_table_has_a_semi_supervised_column_with_std_and_the_control():
    fractions = {key: {"fraction": f, "top1": t, "top1_std": 1.25, "random_init_top1": r}
                 for key, f, t, r in (("1pct", 0.01, 40.0, 20.0), ("10pct", 0.1, 70.0, 45.0))}
    table = results_table(_params(), PRETRAIN, LINEVAL, KNN, _detection("voc", 1), _detection("coco", 1),
                          {"fractions": fractions})
    rows = table.strip().splitlines()
    assert rows[0].endswith("| semi-sup. top-1 (random init) |")
    assert rows[2].endswith("| 40.0 ± 1.2 / 70.0 ± 1.2 (20.0 / 45.0) (1% / 10%) |")
    assert any(row.startswith("| SynCo † |") and row.endswith("| 50.8 / 66.6 (1% / 10%) ‡ |") for row in rows)


def test_markdown_lists_details_and_embeds_figures():
    metrics = {"pretrain": PRETRAIN | {"provenance": {"commit": "abc123"}}, "lineval": LINEVAL, "knn": KNN,
               "voc": _detection("voc", 1), "coco": _detection("coco", 1)}
    text = results_markdown(_params(), metrics, {"training": "Pretraining curves"})
    assert "Provenance: commit: abc123" in text
    assert "300 steps" in text and "38.1 images/s" in text and "8 min 24 s" in text
    assert "gain +0.75" in text and "SLURM job 42 (COMPLETED)" in text and "jobs, 4.00 GPU-h in all" in text
    assert "![Pretraining curves](figures/training.png)" in text


def _tsv(path: Path, name: str, values: list[float], steps: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = steps or list(range(len(values)))
    rows = (f"{1000 + s}\t{s}\t{v}\n" for s, v in zip(steps, values, strict=True))
    path.write_text(f"timestamp\tstep\t{name}\n" + "".join(rows))


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.width > 300 and im.height > 300


def test_figures_from_tiny_run(tmp_path):
    live = tmp_path / "dvclive/pretrain/plots/metrics"
    train, analysis = live / "train", live / "analysis"
    for name, values in {"loss": [5.1, 4.9, 4.8], "proxy_acc": [0.1, 0.2, 0.3],
                         "proxy_acc_with_synthetic": [0.1, 0.15, 0.2], "lr": [0.03, 0.02, 0.01]}.items():
        _tsv(train / f"{name}.tsv", name, values)
    for name in ("alignment", "uniformity", "class_distance_ratio", "val_proxy_acc"):
        _tsv(analysis / f"{name}.tsv", name, [0.5, 0.4], steps=[1, 2])
    for name, values in {"train_loss": [2.0, 1.0], "val_top1": [30.0, 50.0]}.items():
        _tsv(tmp_path / f"dvclive/lineval/plots/metrics/lineval/{name}.tsv", name, values)
    tables = tmp_path / "analysis/pretrain"
    tables.mkdir(parents=True)
    (tables / "hardness.csv").write_text("rank,probability,epoch\n" + "".join(
        f"{r},{0.02 / r},{e}\n" for e in (2, 3) for r in range(1, 9)))
    (tables / "class_distance_ratio.csv").write_text("ratio,count,epoch\n" + "".join(
        f"{0.9 + 0.05 * i:.4f},{i + e},{e}\n" for e in (2, 3) for i in range(5)))
    out = tmp_path / "figures"
    figures = write_figures(tmp_path, out)
    assert list(figures) == ["training", "analysis", "hardness", "class_distance_ratio", "lineval"]
    for name in figures:
        _assert_png(out / f"{name}.png")


def test_missing_optional_inputs_are_skipped(tmp_path):
    train = tmp_path / "dvclive/pretrain/plots/metrics/train"
    _tsv(train / "loss.tsv", "loss", [5.1, 4.9])
    (train / "lr.tsv").write_text("step\tlr\n0\t0.03\n1\t0.01\n")  # dvclive without the timestamp column
    figures = write_figures(tmp_path, tmp_path / "figures")
    assert list(figures) == ["training"]
    _assert_png(tmp_path / "figures/training.png")
