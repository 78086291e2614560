"""DVC stage report: the run's metrics/*.json, dvclive curves and analysis tables -> reports/results.md and
reports/figures/*.png (the table next to the published numbers, run details, figures)."""

import shutil
from pathlib import Path

from pipeline.checkpoint import atomic_write
from pipeline.cli import read_json, run_stage
from pipeline.config import Params
from pipeline.report import results_markdown, write_figures

METRICS = ("pretrain", "lineval", "knn", "voc", "coco")


def main(p: Params) -> None:
    metrics = {name: read_json(f"metrics/{name}.json") for name in METRICS}
    if Path("metrics/semisup.json").is_file():  # the semi-supervised column
        metrics["semisup"] = read_json("metrics/semisup.json")
    figures_dir = Path("reports/figures")
    shutil.rmtree(figures_dir, ignore_errors=True)  # no figure of an earlier run survives a skipped input
    figures = write_figures(Path.cwd(), figures_dir)
    text = results_markdown(p, metrics, figures)
    atomic_write("reports/results.md", lambda f: f.write(text.encode()))
    print(f"report: reports/results.md with {len(figures)} figure(s) in {figures_dir}")


if __name__ == "__main__":
    run_stage("report", main)
