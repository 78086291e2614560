"""DVC stage report: the run's metrics/*.json (with their run records metrics/*.run.json), dvclive curves and
analysis tables -> reports/results.md and reports/figures/*.png (the table next to the published numbers, run
details, figures). Metrics computed with other params than this run's (an experiment that ran only some
stages) are marked stale in the report, never shown as this run's."""

import shutil
from pathlib import Path

from pipeline.checkpoint import atomic_write
from pipeline.cli import read_json, run_record_path, run_stage
from pipeline.config import Params
from pipeline.freshness import is_fresh
from pipeline.report import results_markdown, write_figures

METRICS = ("pretrain", "lineval", "knn", "voc", "coco")


def main(p: Params) -> None:
    metrics, stale = {}, []
    names = [*METRICS, "semisup"] if Path("metrics/semisup.json").is_file() else METRICS  # the semi-supervised column
    for name in names:
        path = Path(f"metrics/{name}.json")
        numbers = read_json(path)
        record = run_record_path(path)
        metrics[name] = numbers | (read_json(record) if record.is_file() else {})
        if not is_fresh(numbers, path, p):
            stale.append(name)
    figures_dir = Path("reports/figures")
    shutil.rmtree(figures_dir, ignore_errors=True)  # no figure of an earlier run survives a skipped input
    figures = write_figures(Path.cwd(), figures_dir)
    text = results_markdown(p, metrics, figures, stale=stale)
    atomic_write("reports/results.md", lambda f: f.write(text.encode()))
    print(f"report: reports/results.md with {len(figures)} figure(s) in {figures_dir}"
          + (f"; stale (other params): {', '.join(stale)}" if stale else ""))


if __name__ == "__main__":
    run_stage("report", main)
