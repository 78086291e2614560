"""One run's results as a markdown report: the MoCHi-paper table next to the published rows, and figures.

Pure functions on the metrics dicts (metrics/*.json) and on the curves the stages log (dvclive TSVs,
analysis CSVs); stages/report.py writes their output. Figures use matplotlib's object API, which renders
PNGs with Agg and never touches pyplot's global state.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.config import PRETRAINED, Params
from pipeline.data.augment import AugParams

# The papers the published rows come from, numbered as the report cites them.
REFERENCES = {
    1: "X. Chen, H. Fan, R. Girshick, K. He. Improved Baselines with Momentum Contrastive Learning. "
       "arXiv:2003.04297, 2020.",
    2: "Y. Kalantidis, M. B. Sariyildiz, N. Pion, P. Weinzaepfel, D. Larlus. Hard Negative Mixing for Contrastive "
       "Learning. NeurIPS 2020, arXiv:2010.01028.",
    3: "N. Giakoumoglou, T. Stathaki. SynCo: Synthetic Hard Negatives for Contrastive Visual Representation "
       "Learning. arXiv:2410.02401, 2024.",
}
# ResNet-50 pretrained on ImageNet-1k as published: method, pretraining epochs, linear top-1, VOC AP50 / AP / AP75,
# COCO APbb / APmk, reference, and gains a paper reports only relative to another method (never put in an
# absolute column). SynCo: 67.9 top-1 is stated in the abstract of arXiv:2410.02401v3/v4 and equals v7's
# "MoCo v2 +0.4, MoCHi +1.0" over the rows above; VOC AP 57.2 is v7's (AP50 / AP75 not in the abstract);
# COCO is given only as gains over MoCo v2.
PUBLISHED = (
    ("MoCo v2", 200, "67.5", "82.4 / 57.0 / 63.6", "", 1, ""),
    ("MoCHi (128, 1024, 512)", 100, "63.4", "81.1 / 54.7 / 60.9", "37.8 / 33.2", 2, ""),
    ("MoCHi (128, 1024, 512)", 200, "66.9", "82.7 / 57.5 / 64.4", "39.2 / 34.3", 2, ""),
    ("MoCHi (512, 1024, 512)", 200, "67.6", "82.7 / 57.1 / 64.1", "39.4 / 34.5", 2, ""),
    ("MoCHi (128, 1024, 512)", 800, "68.7", "83.3 / 57.3 / 64.2", "", 2, ""),
    ("MoCHi (512, 1024, 512)", 1000, "70.6", "83.2 / 58.4 / 65.5", "", 2, ""),
    ("SynCo", 200, "67.9", "– / 57.2 / –", "", 3, "COCO APbb +1.0, APmk +0.8 over MoCo v2"),
)
COLUMNS = ("method", "arch", "epochs", "linear top-1 (best epoch)", "kNN top-1 (random init)",
           "VOC AP50 / AP / AP75", "COCO APbb / APmk", "semi-sup. top-1 (random init)", "reported only as a gain")
# Semi-supervised top-1 with 1% / 10% of the ImageNet labels (fine-tuning), by method of PUBLISHED: SynCo's as
# listed for arXiv 2410.02401 by wizwand.com's benchmark table (the paper's own table was not reachable when this
# was written; its pretraining epochs are not given there).
PUBLISHED_SEMISUP = {"SynCo": "50.8 / 66.6 (1% / 10%) ‡"}

PRIMARY_LINEVAL = "top1_best"  # the linear top-1 this report (and pipeline.compare) leads with: MoCo's main_lincls best
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
         "ytick.labelsize": 10, "legend.fontsize": 10, "figure.titlesize": 13, "axes.grid": True,
         "grid.alpha": 0.3, "savefig.dpi": 150}
PANEL = (4.6, 3.4)  # inches per subplot
INIT = {"pretrained": "the pretrained backbone", "random": "a random-init backbone (the control)"}


def method_label(p: Params) -> str:
    """The method as the papers name it, with its hyper-parameters and any loss variant, for the table."""
    pt = p.pretrain
    if pt.method == "mochi":
        label = f"MoCHi ({pt.mochi.n_hard}, {pt.mochi.s}, {pt.mochi.s_prime})"
    elif pt.method == "synco":
        label = f"SynCo (N={pt.synco.n_hard}; {'/'.join(str(n) for n in pt.synco.counts)})"
    else:
        label = "MoCo v2"
    if pt.loss == "dcl":
        label += f" + DCL (tau+={pt.tau_plus:g})"
    elif pt.loss == "hcl":
        label += f" + HCL (tau+={pt.tau_plus:g}, beta={pt.beta:g})"
    if pt.drop_hardest:
        label += f" + drop {100 * pt.drop_hardest:g}% hardest"
    return label


def _ap(m: dict, key: str, show_std: bool) -> str:
    return f"{m[key]:.1f} ± {m[key + '_std']:.1f}" if show_std else f"{m[key]:.1f}"


def _row(cells: tuple) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def semisup_cell(semisup: dict | None) -> str:
    """'a ± s / b ± s (1% / 10%)' of metrics/semisup.json, the control's mean in brackets; '' without the stage."""
    if not semisup:
        return ""
    fr = semisup["fractions"].values()
    cell = " / ".join(f"{m['top1']:.1f} ± {m['top1_std']:.1f}" for m in fr)
    if all("random_init_top1" in m for m in fr):
        cell += " (" + " / ".join(f"{m['random_init_top1']:.1f}" for m in fr) + ")"
    return cell + " (" + " / ".join(f"{100 * m['fraction']:g}%" for m in fr) + ")"


def results_table(p: Params, pretrain: dict, lineval: dict, knn: dict, voc: dict, coco: dict,
                  semisup: dict | None = None, stale: tuple = ()) -> str:
    """Markdown table in the shape of the MoCHi paper's: this run first, then the published rows.

    Detection cells carry mean ± std over trials when there was more than one (the papers' VOC protocol).
    A cell from a stage in `stale` (metrics computed with other params) is struck through and marked."""
    voc_std, coco_std = len(voc["trials"]) > 1, len(coco["trials"]) > 1
    voc_cell = " / ".join(_ap(voc["bbox"], k, voc_std) for k in ("AP50", "AP", "AP75"))
    coco_cell = " / ".join(_ap(coco[kind], "AP", coco_std) for kind in ("bbox", "segm"))
    voc_cell += " (random init)" if voc["init"] == "random" else ""
    coco_cell += " (random init)" if coco["init"] == "random" else ""
    cells = {"pretrain": pretrain["epochs"], "lineval": f"{lineval[PRIMARY_LINEVAL]:.1f} ({lineval['top1']:.1f} last)",
             "knn": f"{knn['top1']:.1f} ({knn['random_init_top1']:.1f})", "voc": voc_cell, "coco": coco_cell,
             "semisup": semisup_cell(semisup)}
    cells = {k: f"~~{v}~~ stale" if k in stale and v != "" else v for k, v in cells.items()}
    ours = (f"**{method_label(p)}** (this run)", f"R-{p.model.arch.removeprefix('resnet')}", cells["pretrain"],
            cells["lineval"], cells["knn"], cells["voc"], cells["coco"], cells["semisup"], "")
    published = [(f"{method} [{ref}] †", "R-50", epochs, linear, "", voc_pub, coco_pub,
                  PUBLISHED_SEMISUP.get(method, ""), gain)
                 for method, epochs, linear, voc_pub, coco_pub, ref, gain in PUBLISHED]
    return "\n".join([_row(COLUMNS), _row(["---"] * len(COLUMNS)), _row(ours), *map(_row, published)]) + "\n"


def _duration(seconds: float) -> str:
    h, rest = divmod(round(seconds), 3600)
    return f"{h} h {rest // 60} min" if h else f"{rest // 60} min {rest % 60} s"


def _job(name: str, job: dict) -> str:
    where = f"SLURM job {job['job_id']} ({job['state']})" if job["executor"] == "slurm" else "local"
    return f"{name}: {where}, {job['hours']:.2f} h, {job['gpu_hours']:.2f} GPU-h"


def provenance_table(metrics: dict[str, dict]) -> str:
    """What produced each metrics file, one row per stage (commit, uncommitted changes, params hash, seed,
    processes), and the package versions once (or per stage where they differ): a reader checks at a glance
    that every number came from the same code."""
    rows, versions = [], {}
    for stage, m in metrics.items():
        prov = m.get("provenance")
        if not isinstance(prov, dict):
            continue
        commit = str(prov.get("git_commit", "unknown"))
        tree = "with uncommitted changes" if prov.get("git_dirty") else "clean"
        seed = "–" if prov.get("seed") is None else prov["seed"]
        rows.append((stage, f"`{commit[:10]}`", tree, f"`{prov.get('params_hash', '')}`", seed,
                     prov.get("world_size", "")))
        versions[stage] = ", ".join(f"{name.removeprefix('sal-')} {v}" for name, v in sorted(
            (prov.get("versions") or {}).items()))
    if not rows:
        return ""
    table = [_row(("stage", "commit", "work tree", "params hash", "seed", "processes")), _row(["---"] * 6),
             *map(_row, rows)]
    distinct = sorted(set(versions.values()))
    if len(distinct) == 1:
        table += ["", f"Versions: {distinct[0]}."]
    else:
        table += ["", *(f"- versions for {stage}: {v}" for stage, v in versions.items())]
    return "\n".join(table) + "\n"


def references() -> str:
    """The papers of the published rows, as a numbered list."""
    return "\n".join(["References:", "", *(f"{n}. {text}" for n, text in REFERENCES.items())]) + "\n"


def _seeds(run: object) -> str:
    """'seed 3' for one trial, 'seeds 3-7' for several (trials use seed, seed + 1, ...)."""
    return f"seed {run.seed}" if run.trials == 1 else f"seeds {run.seed}-{run.seed + run.trials - 1}"


def error_bars_note(p: Params, voc: dict, coco: dict) -> str:
    """Which cells are one run and which a mean ± std, over how many runs and which seeds."""
    parts = []
    for name, m, run in (("VOC", voc, p.detection.voc), ("COCO", coco, p.detection.coco)):
        n = len(m["trials"])
        parts.append(f"{name}: mean ± sample std over {n} trials ({_seeds(run)})" if n > 1
                     else f"{name}: one trial ({_seeds(run)})")
    return (f"This run: linear top-1 and kNN are one run (pretraining seed {p.pretrain.seed}, linear-eval seed "
            f"{p.lineval.seed}); " + "; ".join(parts) + ".")


def weights_note(p: Params) -> list[str]:
    """A line naming the weights evaluated when a stage did not evaluate this run's pretraining output."""
    files = {"linear eval": p.lineval.checkpoint, "kNN": p.knn.checkpoint}
    if p.detection.init == "pretrained":
        files["detection"] = p.detection.checkpoint
    external = {stage: f for stage, f in files.items() if f != PRETRAINED}
    if not external:
        return []
    return ["", "**Weights from elsewhere:** " + "; ".join(f"{stage} evaluated `{f}`" for stage, f in external.items())
            + f" instead of this run's pretraining output (`{PRETRAINED}`): those cells are not this run's method."]


def hyperparameter_table(p: Params, pretrain: dict) -> str:
    """The settings of this run as a paper's appendix lists them, read from the params the stages ran with."""
    pt, lv, kn, aug = p.pretrain, p.lineval, p.knn, AugParams()
    world = pretrain.get("world_size", p.world_size)
    batch = pt.batch_size * world
    hard = {"moco": "none",
            "mochi": f"MoCHi: N = {pt.mochi.n_hard}, s = {pt.mochi.s}, s' = {pt.mochi.s_prime}",
            "synco": f"SynCo: N = {pt.synco.n_hard}, n1..n6 = {'/'.join(map(str, pt.synco.counts))}, "
                     f"sigma = {pt.synco.sigma:g}, delta = {pt.synco.delta:g}, eta = {pt.synco.eta:g}"}[pt.method]
    if pt.method != "moco":
        hard += f"; from epoch {pt.hard_start_epoch}"
    loss = {"infonce": "InfoNCE", "dcl": f"DCL (tau+ = {pt.tau_plus:g})",
            "hcl": f"HCL (tau+ = {pt.tau_plus:g}, beta = {pt.beta:g})"}[pt.loss]
    if pt.drop_hardest:
        loss += f", {100 * pt.drop_hardest:g}% hardest negatives dropped"
    schedule = pt.schedule + (f" (x0.1 at {', '.join(f'{s:g}' for s in pt.lr_steps)} of training)"
                              if pt.schedule == "step" else "")
    b, c, s, h = aug.jitter
    augmentation = (f"aug+: random resized crop {pt.res} px, scale {pt.crop_scale[0]:g}-{pt.crop_scale[1]:g}; "
                    f"colour jitter ({b:g}, {c:g}, {s:g}, {h:g}) p = {aug.p_jitter:g}; grayscale p = {aug.p_gray:g}; "
                    f"Gaussian blur sigma {pt.blur_sigma[0]:g}-{pt.blur_sigma[1]:g} p = {aug.p_blur:g}; "
                    f"horizontal flip p = {aug.p_flip:g}")
    shuffle_bn = (f"across {world} processes" if world > 1 else
                  f"emulated with {pt.bn_splits} BN groups" if pt.bn_splits > 1 else "off (one process)")
    voc, coco = p.detection.voc, p.detection.coco
    rows = [
        ("Pretraining", "backbone", f"ResNet-{p.model.arch.removeprefix('resnet')}"),
        ("", "epochs", pt.epochs),
        ("", "batch (global)", f"{batch} ({pt.batch_size} x {world} process{'es' if world > 1 else ''})"),
        ("", "learning rate", f"{pt.lr * batch / 256:g} ({pt.lr:g} per 256), SGD momentum {pt.momentum:g}, "
                              f"weight decay {pt.weight_decay:g}, {schedule}"),
        ("", "queue K / key momentum m / temperature T", f"{pt.queue_size} / {pt.key_momentum:g} / {pt.temperature:g}"),
        ("", "projection head", f"{'MLP (v2)' if pt.mlp else 'linear (v1)'}, {pt.dim}-d"),
        ("", "shuffle BN", shuffle_bn),
        ("", "augmentation", augmentation),
        ("", "hard negatives", hard),
        ("", "loss", loss),
        ("", "queue initialisation", {"keys": "real keys", "random": "random unit vectors"}[pt.queue_init]),
        ("", "seed", pt.seed),
        ("Linear eval", "schedule", f"{lv.epochs} epochs, batch {lv.batch_size}, lr {lv.lr:g}, momentum "
                                    f"{lv.momentum:g}, weight decay {lv.weight_decay:g}, x0.1 at "
                                    f"{', '.join(f'{s:g}' for s in lv.lr_steps)} of training"),
        ("", "input", f"{lv.res} px, " + ("random resized crop + flip" if lv.augment else "fixed features")),
        ("", "seed", lv.seed),
        ("kNN", "k / T", f"{kn.k} / {kn.temperature:g}"),
        ("VOC detection", "schedule", f"Faster R-CNN C4, {voc.max_iter} iterations, batch {voc.ims_per_batch}, "
                                      f"lr {voc.base_lr:g}, {voc.roi_batch_size} ROIs per image"),
        ("", "trials", f"{voc.trials} ({_seeds(voc)})"),
        ("COCO detection", "schedule", f"Mask R-CNN C4, {coco.schedule} shape, {coco.max_iter} iterations, batch "
                                       f"{coco.ims_per_batch}, lr {coco.base_lr:g}, {coco.roi_batch_size} ROIs per "
                                       f"image"),
        ("", "trials", f"{coco.trials} ({_seeds(coco)})"),
    ]
    return "\n".join(["## Hyperparameters", "", _row(("", "hyperparameter", "this run")), _row(["---"] * 3),
                      *(_row((f"**{group}**" if group else "", name, value)) for group, name, value in rows)]) + "\n"


def results_markdown(p: Params, metrics: dict[str, dict], figures: dict[str, str], stale: list | tuple = ()) -> str:
    """reports/results.md: title, provenance, the table, run details and the embedded figures.

    metrics: the contents of metrics/{pretrain,lineval,knn,voc,coco}.json, each with its run record
    (metrics/<name>.run.json), by stage name; figures: the {file stem: caption} that write_figures returned;
    stale: the names whose metrics were computed with other params than `p` (marked, never passed off as
    this run's)."""
    pre, lin, kn, voc, coco = (metrics[k] for k in ("pretrain", "lineval", "knn", "voc", "coco"))
    jobs = {name: m["job"] for name, m in metrics.items() if "job" in m}
    lines = [f"# Results: {method_label(p)} ({p.model.arch}, {pre['epochs']} epochs)", ""]
    if stale:
        lines += [f"**Stale:** {', '.join(f'metrics/{name}.json' for name in stale)} were computed with other params "
                  "than this run's (an experiment that did not run those stages): struck through in the table; "
                  "`dvc repro` recomputes them.", ""]
    lines += [
        results_table(p, pre, lin, kn, voc, coco, metrics.get("semisup"), tuple(stale)),
        "† Published numbers for ResNet-50 pretrained on ImageNet-1k [1-3]; other backbone, data and schedule, so "
        "not comparable in absolute terms with this run. " + error_bars_note(p, voc, coco),
        "‡ Semi-supervised (SimCLR's 1% / 10% ImageNet lists, whole network fine-tuned): SynCo's top-1 as listed for "
        "arXiv 2410.02401 by a benchmark site, pretraining epochs not stated there; this run: mean ± std over "
        "semisup.trials, the random-init control in brackets.",
        *weights_note(p),
        "",
        references(),
        hyperparameter_table(p, pre),
        "## Run details",
        "",
        f"- pretraining: {pre['steps']} steps over {pre['epochs']} epochs on {pre['world_size']} process(es), "
        f"{pre['images_per_s']} images/s, wall time {_duration(pre['seconds'])}",
        f"- linear eval: top-1 {lin['top1_best']:.2f} at its best epoch ({lin['best_epoch']} of {lin['epochs']}; "
        f"top-5 {lin['top5_best']:.2f}), {lin['top1']:.2f} after the last (top-5 {lin['top5']:.2f}). The table's "
        "linear column gives the best epoch, as MoCo's main_lincls.py reports it and the published rows use it "
        "(selected on the validation set, so optimistic); the last epoch is the unselected figure",
        f"- kNN (k={kn['k']}, T={kn['temperature']:g}): top-1 {kn['top1']:.2f} vs {kn['random_init_top1']:.2f} "
        f"from random init, gain {kn['gain']:+.2f}",
        f"- VOC detection: {voc['iterations']} iterations x {len(voc['trials'])} trial(s) from {INIT[voc['init']]}",
        f"- COCO detection: {coco['iterations']} iterations ({p.detection.coco.schedule} schedule shape) x "
        f"{len(coco['trials'])} trial(s) from {INIT[coco['init']]}",
        f"- jobs, {sum(j['gpu_hours'] for j in jobs.values()):.2f} GPU-h in all:",
        *(f"  - {_job(name, job)}" for name, job in jobs.items()),
    ]
    if provenance := provenance_table(metrics):
        lines += ["", "## Provenance", "", provenance]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{caption}](figures/{name}.png)\n" for name, caption in figures.items()]
    return "\n".join(lines).rstrip() + "\n"


def read_curve(path: Path) -> tuple[list[float], list[float]] | None:
    """(dvclive step, value) of a dvclive TSV (step and the metric's column, timestamp if any ignored); None if
    the file is absent."""
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    name = path.stem
    return [float(r["step"]) for r in rows], [float(r[name]) for r in rows]


def _by_epoch(path: Path, x: str, y: str) -> dict[int, tuple[list[float], list[float]]]:
    """A long-format analysis CSV as {epoch: (x values, y values)}; empty if the file is absent."""
    out: dict[int, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    if path.is_file():
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                xs, ys = out[int(r["epoch"])]
                xs.append(float(r[x]))
                ys.append(float(r[y]))
    return dict(sorted(out.items()))


def _epochs(steps: list[float]) -> list[float]:
    """dvclive steps -> 1-based epochs: pretrain and lineval call next_step once per epoch."""
    return [s + 1 for s in steps]


def _markers(xs: list) -> dict:
    """Point markers while the points can be told apart (a toy run's few epochs), plain lines beyond."""
    return {"marker": "o", "markersize": 4} if len(xs) <= 40 else {}


def _epoch_panels(title: str, panels: list[tuple], out: Path) -> bool:
    """One figure of per-epoch panels (title, y label, y scale, [(curve, line kwargs)]); a panel whose curves
    are all missing is left out, and nothing is written when none is left. Up to 3 panels in a row, else 2x2."""
    panels = [(t, ylabel, yscale, [(c, kw) for c, kw in lines if c]) for t, ylabel, yscale, lines in panels]
    panels = [panel for panel in panels if panel[3]]
    if not panels:
        return False
    cols = len(panels) if len(panels) <= 3 else 2
    rows = -(-len(panels) // cols)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(PANEL[0] * cols, PANEL[1] * rows), layout="constrained")
        fig.suptitle(title)
        axes = list(fig.subplots(rows, cols, squeeze=False).flat)
        for ax, (panel_title, ylabel, yscale, lines) in zip(axes, panels, strict=False):
            for (steps, values), kw in lines:
                ax.plot(_epochs(steps), values, **_markers(steps), **kw)
            ax.set(xlabel="epoch", ylabel=ylabel, title=panel_title, yscale=yscale)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if any("label" in kw for _, kw in lines):
                ax.legend(loc="best")
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        fig.savefig(out)
    return True


def _percent(curve: tuple[list[float], list[float]] | None) -> tuple[list[float], list[float]] | None:
    return curve and (curve[0], [100 * v for v in curve[1]])


def plot_training(live: Path, out: Path) -> bool:
    """(a) loss, proxy-task accuracy and lr per epoch: is the contrastive task being learned, on schedule?

    The with-synthetic curve is drawn only where it differs from the plain one (plain MoCo logs the same)."""
    loss, plain, synthetic, lr = (read_curve(live / "plots/metrics/train" / f"{name}.tsv")
                                  for name in ("loss", "proxy_acc", "proxy_acc_with_synthetic", "lr"))
    if synthetic == plain:
        synthetic = None
    return _epoch_panels("Pretraining (epoch means)", [
        ("Contrastive loss", "loss", "linear", [(loss, {})]),
        ("Proxy-task accuracy", "positive ranked first (%)", "linear",
         [(_percent(plain), {"label": "vs real negatives"}),
          (_percent(synthetic), {"label": "vs real + synthetic negatives", "linestyle": "--"})]),
        ("Learning rate", "learning rate", "linear", [(lr, {"color": "tab:green"})]),
    ], out)


def plot_analysis(live: Path, out: Path) -> bool:
    """(b) the papers' val-set analyses per analysed epoch: how the embedding's geometry evolves."""
    alignment, uniformity, val_acc, ratio = (read_curve(live / "plots/metrics/analysis" / f"{name}.tsv")
                                             for name in ("alignment", "uniformity", "val_proxy_acc",
                                                          "class_distance_ratio"))
    style = {"color": "tab:purple"}
    return _epoch_panels("Val-set analyses", [
        ("Alignment (lower = better)", r"$\mathbb{E}\,\|f(x) - f(x^+)\|^2$", "linear", [(alignment, style)]),
        ("Uniformity (lower = better)", r"$\log\,\mathbb{E}\,\exp(-2\|f(x) - f(y)\|^2)$", "linear",
         [(uniformity, style)]),
        ("Val proxy-task accuracy", "positive ranked first (%)", "linear", [(_percent(val_acc), style)]),
        ("Class-distance ratio (higher = better)", "inter / intra distance", "linear", [(ratio, style)]),
    ], out)


MAX_EPOCHS_SHOWN = 6  # epochs per hardness / histogram figure: more cannot be told apart


def _some_epochs(per_epoch: dict) -> tuple[dict, str]:
    """At most MAX_EPOCHS_SHOWN analysed epochs, evenly spread, first and last kept; and a title note if thinned."""
    epochs = list(per_epoch)
    if len(epochs) <= MAX_EPOCHS_SHOWN:
        return per_epoch, ""
    keep = sorted({epochs[round(i * (len(epochs) - 1) / (MAX_EPOCHS_SHOWN - 1))] for i in range(MAX_EPOCHS_SHOWN)})
    return {e: per_epoch[e] for e in keep}, f"{len(keep)} of {len(epochs)} analysed epochs"


def _epoch_colors(n: int) -> list:
    """Early epochs dark, late ones light (viridis, its hard-to-see yellow end left out)."""
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]


def _plot_by_rank(csv: Path, column: str, yscale: str, ylabel: str, title: str, out: Path) -> bool:
    """One curve per analysed epoch of `column` against the rank of the queue negative (1 = hardest)."""
    curves, note = _some_epochs(_by_epoch(csv, "rank", column))
    if not curves:
        return False
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(7.6, 4.4), layout="constrained")
        ax = fig.subplots()
        for (epoch, (ranks, values)), color in zip(curves.items(), _epoch_colors(len(curves)), strict=True):
            ax.plot(ranks, values, color=color, linewidth=1.8, label=f"epoch {epoch}")
        ax.set(xscale="log", yscale=yscale, xlabel="rank of the negative in the queue (1 = hardest, log scale)",
               ylabel=ylabel, title=title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), title=note or None)  # outside: never over a curve
        fig.savefig(out)
    return True


def plot_hardness(analysis: Path, out: Path) -> bool:
    """(c) the MoCHi/SynCo hardness figure: sorted top queue probabilities per epoch; mass moving to the
    first ranks means fewer, harder negatives carry the loss."""
    return _plot_by_rank(analysis / "hardness.csv", "probability", "log", "matching probability (softmax, log scale)",
                         "Hardness: sorted top queue probabilities (val)", out)


def plot_false_negatives(analysis: Path, out: Path) -> bool:
    """(f) share of same-class keys among each val query's r-th hardest negatives: how many of the
    hardest negatives, which the hard-negative methods mix and reweight, are really false negatives."""
    return _plot_by_rank(analysis / "false_negatives.csv", "same_class_share", "linear",
                         "share of the query's own class", "False negatives by hardness rank (val)", out)


def plot_wordnet(analysis: Path, out: Path) -> bool:
    """(g) mean Wu-Palmer similarity of the r-th hardest negative's class to the query's class (WordNet,
    classes named by ImageNet ids): are the hardest negatives semantically close classes?"""
    return _plot_by_rank(analysis / "wordnet.csv", "wup_similarity", "linear",
                         "Wu-Palmer similarity to the query's class", "Semantic similarity by hardness rank (val)",
                         out)


def plot_synthetic_sources(analysis: Path, out: Path) -> bool:
    """(h) per type of synthetic point, the share made from negatives of the query's own class, at the first
    and last analysed epochs: a "hard negative" made from false negatives pushes the query from its class.
    For points mixed from two negatives, the dark part of a bar is the share with both from the class."""
    path = analysis / "synthetic_sources.csv"
    if not path.is_file():
        return False
    shares: dict[int, dict[str, tuple[float, float]]] = defaultdict(dict)  # {epoch: {type: (all, any)}}
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            shares[int(r["epoch"])][r["type"]] = (100 * float(r["same_class_all"]), 100 * float(r["same_class_any"]))
    if not shares:
        return False
    epochs = sorted({min(shares), max(shares)})
    types = list(shares[epochs[-1]])
    height = 0.8 / len(epochs)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(8.2, 1.4 + 0.55 * len(types) * len(epochs)), layout="constrained")
        ax = fig.subplots()
        for e, (epoch, color) in enumerate(zip(epochs, _epoch_colors(len(epochs)), strict=True)):
            y = [i + (e - (len(epochs) - 1) / 2) * height for i in range(len(types))]
            every, some = zip(*(shares[epoch].get(t, (0.0, 0.0)) for t in types), strict=True)
            ax.barh(y, some, height=height, color=color, alpha=0.35)
            ax.barh(y, every, height=height, color=color, label=f"epoch {epoch}")
            for yi, v in zip(y, some, strict=True):
                ax.annotate(f"{v:.0f}%", (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=9)
        ax.set_yticks(range(len(types)), types)
        ax.invert_yaxis()
        ax.set(xlabel="synthetic points made from same-class negatives (%)\n"
                      "(two sources: dark = both, whole bar = at least one)",
               xlim=(0, 105), title="Synthetic negatives made from false negatives (val)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.savefig(out)
    return True


def plot_class_ratio(analysis: Path, out: Path) -> bool:
    """(d) histogram of per-sample inter/intra class distance, one panel per epoch on a shared x axis:
    mass moving right of 1 = classes separating."""
    hists, note = _some_epochs(_by_epoch(analysis / "class_distance_ratio.csv", "ratio", "count"))
    if not hists:
        return False
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(6.4, 1.2 + 1.4 * len(hists)), layout="constrained")
        fig.suptitle("Class-distance ratio per val sample" + (f"\n({note})" if note else ""))
        axes = fig.subplots(len(hists), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (epoch, (centres, counts)), color in zip(axes, hists.items(), _epoch_colors(len(hists)), strict=True):
            half = (centres[1] - centres[0]) / 2 if len(centres) > 1 else 0.005
            ax.stairs(counts, [c - half for c in centres] + [centres[-1] + half], color=color, fill=True, alpha=0.8)
            ax.axvline(1.0, color="0.3", linestyle=":", linewidth=1.2)
            ax.set_title(f"epoch {epoch}", loc="right", fontsize=10, pad=3)
            ax.set_ylabel("samples")
        axes[-1].set_xlabel("inter / intra class distance (dotted: 1 = no separation)")
        fig.savefig(out)
    return True


def plot_lineval(live: Path, out: Path) -> bool:
    """(e) linear-eval training loss and val top-1 per epoch: did the linear probe converge?"""
    loss, top1 = (read_curve(live / "plots/metrics/lineval" / f"{name}.tsv") for name in ("train_loss", "val_top1"))
    return _epoch_panels("Linear evaluation (frozen backbone)", [
        ("Training loss", "cross-entropy (log scale)", "log", [(loss, {})]),
        ("Val top-1", "top-1 (%)", "linear", [(top1, {"color": "tab:orange"})]),
    ], out)


def write_figures(root: Path, out_dir: Path) -> dict[str, str]:
    """Every figure whose inputs exist under `root` (a run's dvclive/ and analysis/) as out_dir/<name>.png;
    returns {name: caption} of those written, so a missing optional input is skipped, not an error."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pretrain, lineval, analysis = root / "dvclive/pretrain", root / "dvclive/lineval", root / "analysis/pretrain"
    figures = (
        ("training", "Pretraining curves", plot_training, pretrain),
        ("analysis", "Val-set analyses", plot_analysis, pretrain),
        ("hardness", "Hardness of the queue's negatives", plot_hardness, analysis),
        ("class_distance_ratio", "Class-distance ratio histograms", plot_class_ratio, analysis),
        ("false_negatives", "Same-class (false) negatives by hardness rank", plot_false_negatives, analysis),
        ("wordnet", "WordNet similarity of the hard negatives to the query's class", plot_wordnet, analysis),
        ("synthetic_sources", "Synthetic negatives made from same-class negatives", plot_synthetic_sources, analysis),
        ("lineval", "Linear-evaluation curves", plot_lineval, lineval),
    )
    return {name: caption for name, caption, plot, src in figures if plot(src, out_dir / f"{name}.png")}
