"""The report: method labels, the results table against hand-written metrics, figures from tiny curve files."""

from pathlib import Path

from PIL import Image

from pipeline.config import Params
from pipeline.report import (
    PUBLISHED,
    REFERENCES,
    hyperparameter_table,
    method_label,
    provenance_table,
    results_markdown,
    results_table,
    write_figures,
)

JOB = {"executor": "local", "hours": 0.1, "gpu_hours": 0.0}
PRETRAIN = {"method": "mochi", "epochs": 6, "steps": 300, "world_size": 1, "images_per_s": 38.1, "seconds": 504.1,
            "job": JOB}
LINEVAL = {"top1": 73.25, "top5": 99.0, "top1_best": 74.5, "top5_best": 99.25, "best_epoch": 28, "epochs": 30,
           "job": JOB}
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
    assert rows[0].startswith("| method | arch | epochs | linear top-1 (best epoch) | kNN top-1 (random init)")
    assert rows[2] == ("| **MoCHi (16, 16, 8)** (this run) | R-18 | 6 | 74.5 (73.2 last) | 68.8 (68.0) "
                       "| 40.0 / 20.0 / 15.0 | 20.0 / 21.0 |  |  |")
    assert len(rows) == 3 + len(PUBLISHED)
    assert "| MoCo v2 [1] † | R-50 | 200 | 67.5 |  | 82.4 / 57.0 / 63.6 |  |  |  |" in rows
    assert "| MoCHi (512, 1024, 512) [2] † | R-50 | 1000 | 70.6 |  | 83.2 / 58.4 / 65.5 |  |  |  |" in rows


def test_published_cells_hold_absolute_numbers_and_gains_have_their_own_column():
    """The SynCo paper reports COCO only as gains over MoCo v2: those go to the gain column, never into an
    absolute one; every published row cites a reference."""
    table = results_table(_params(), PRETRAIN, LINEVAL, KNN, _detection("voc", 1), _detection("coco", 1))
    synco = next(row for row in table.splitlines() if row.startswith("| SynCo"))
    assert synco == ("| SynCo [3] † | R-50 | 200 | 67.9 |  | – / 57.2 / – |  | 50.8 / 66.6 (1% / 10%) ‡ "
                     "| COCO APbb +1.0, APmk +0.8 over MoCo v2 |")
    for method, _, linear, voc, coco, ref, _ in PUBLISHED:
        assert ref in REFERENCES, method
        for cell in (linear, voc, coco):
            assert "+" not in cell and all(part.strip() in ("", "–") or float(part) > 0 for part in cell.split("/"))


def test_table_shows_std_over_several_trials_and_marks_random_init():
    coco = _detection("coco", 1) | {"init": "random"}
    table = results_table(_params(), PRETRAIN, LINEVAL, KNN, _detection("voc", 5), coco)
    assert "| 40.0 ± 0.2 / 20.0 ± 0.2 / 15.0 ± 0.2 | 20.0 / 21.0 (random init) |  |  |" in table
    p = _params()
    p.detection.voc.trials, p.detection.voc.seed = 5, 3
    text = results_markdown(p, {"pretrain": PRETRAIN, "lineval": LINEVAL, "knn": KNN, "voc": _detection("voc", 5),
                                "coco": coco}, {})
    assert "VOC: mean ± sample std over 5 trials (seeds 3-7); COCO: one trial (seed 0)." in text
    assert "| **VOC detection** | schedule |" in text and "|  | trials | 5 (seeds 3-7) |" in text


def test_table_has_a_semi_supervised_column_with_std_and_the_control():
    fractions = {key: {"fraction": f, "top1": t, "top1_std": 1.25, "random_init_top1": r}
                 for key, f, t, r in (("1pct", 0.01, 40.0, 20.0), ("10pct", 0.1, 70.0, 45.0))}
    table = results_table(_params(), PRETRAIN, LINEVAL, KNN, _detection("voc", 1), _detection("coco", 1),
                          {"fractions": fractions})
    rows = table.strip().splitlines()
    assert rows[0].endswith("| semi-sup. top-1 (random init) | reported only as a gain |")
    assert rows[2].endswith("| 40.0 ± 1.2 / 70.0 ± 1.2 (20.0 / 45.0) (1% / 10%) |  |")
    assert any(row.startswith("| SynCo [3] † |") and "| 50.8 / 66.6 (1% / 10%) ‡ |" in row for row in rows)


def test_markdown_lists_details_and_embeds_figures():
    metrics = {"pretrain": PRETRAIN | {"provenance": PROVENANCE}, "lineval": LINEVAL, "knn": KNN,
               "voc": _detection("voc", 1), "coco": _detection("coco", 1)}
    text = results_markdown(_params(), metrics, {"training": "Pretraining curves"})
    assert "| pretrain | `abc123def4` | clean | `ab1186c937a974b6` | 0 | 1 |" in text
    assert "Versions: ffcv 1.0.2, detectron2 0.7.2, torch 2.14.1." in text
    assert "{" not in text.split("## Provenance")[1]  # no raw Python dict
    assert "References:" in text and "arXiv:2410.02401" in text
    assert "Weights from elsewhere" not in text
    assert "300 steps" in text and "38.1 images/s" in text and "8 min 24 s" in text
    assert "gain +0.75" in text and "SLURM job 42 (COMPLETED)" in text and "jobs, 4.00 GPU-h in all" in text
    assert "![Pretraining curves](figures/training.png)" in text


PROVENANCE = {"git_commit": "abc123def4567890", "git_dirty": False, "params_hash": "ab1186c937a974b6", "seed": 0,
              "world_size": 1, "versions": {"torch": "2.14.1", "ffcv": "1.0.2", "sal-detectron2": "0.7.2"}}


def test_provenance_rows_per_stage_and_versions_where_they_differ():
    other = PROVENANCE | {"git_commit": "fedcba9876543210", "git_dirty": True, "seed": None,
                          "versions": PROVENANCE["versions"] | {"torch": "2.15.0"}}
    table = provenance_table({"pretrain": {"provenance": PROVENANCE}, "voc": {"provenance": other}, "knn": {}})
    assert "| voc | `fedcba9876` | with uncommitted changes | `ab1186c937a974b6` | – | 1 |" in table
    assert "- versions for voc: ffcv 1.0.2, detectron2 0.7.2, torch 2.15.0" in table
    assert "knn" not in table  # no provenance recorded: no row
    assert provenance_table({"knn": {}}) == ""


def test_hyperparameter_table_reads_the_params_the_run_used():
    p = _params("synco", epochs=200, batch_size=32, lr=0.03, queue_size=65536, key_momentum=0.999,
                hard_start_epoch=10, loss="hcl", tau_plus=0.01)
    p.pretrain.synco.n_hard, p.pretrain.synco.counts = 1024, [256, 256, 256, 64, 64, 64]
    table = hyperparameter_table(p, {"world_size": 8})
    assert "| **Pretraining** | backbone | ResNet-18 |" in table
    assert "|  | batch (global) | 256 (32 x 8 processes) |" in table
    assert "|  | learning rate | 0.03 (0.03 per 256), SGD momentum 0.9, weight decay 0.0001, cosine |" in table
    assert "|  | queue K / key momentum m / temperature T | 65536 / 0.999 / 0.2 |" in table
    assert ("|  | hard negatives | SynCo: N = 1024, n1..n6 = 256/256/256/64/64/64, sigma = 0.01, delta = 0.01, "
            "eta = 0.01; from epoch 10 |") in table
    assert "|  | loss | HCL (tau+ = 0.01, beta = 1) |" in table
    assert "|  | shuffle BN | across 8 processes |" in table
    assert "scale 0.2-1; colour jitter (0.4, 0.4, 0.4, 0.1) p = 0.8; grayscale p = 0.2" in table
    assert "MoCHi: N = 16, s = 16, s' = 8; from epoch 3" in hyperparameter_table(_params("mochi"), {"world_size": 1})


def test_external_weights_are_named_in_the_report():
    p = _params()
    p.lineval.checkpoint = "/weights/moco_v2_200ep_pretrain.pth.tar"
    metrics = {"pretrain": PRETRAIN, "lineval": LINEVAL, "knn": KNN, "voc": _detection("voc", 1),
               "coco": _detection("coco", 1)}
    text = results_markdown(p, metrics, {})
    assert ("**Weights from elsewhere:** linear eval evaluated `/weights/moco_v2_200ep_pretrain.pth.tar` instead of "
            "this run's pretraining output (`models/pretrain/checkpoint.pt`)") in text


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
