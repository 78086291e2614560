"""Images/s of one MoCo v2 pretraining step for each method (moco, mochi, synco), relative to moco, with the time
of every phase of the step; optionally a bf16-autocast and/or channels-last step against the plain fp32 step
of the same method.

    python -m bench.pretrain_step [--device cpu|cuda] [--methods moco mochi synco] [--amp bf16]
        [--channels-last] [--bn-splits 8] [--arch resnet18] [--res 64] [--batch-size 64] [--queue-size 4096]
        [--steps 10] [--warmup 3] [--workers 2] [--images 512]   (from the repo root; ends with RESULT {json})

Each step is a call of pipeline/train/step.train_step itself: the batch to the device, MoCo forward (query
encoder, momentum update, shuffled keys, fp32 logits against the queue), step_loss (synthetic negatives from
each query's own top N, loss), backward, SGD step, enqueue; with the params' defaults (pipeline/config.py) for
everything not given here, the MoCHi and SynCo settings printed in the header. Batches come from the real
TwoViewLoader (ffcv + batched aug+) on a toy .beton built in a temp dir, so "data" is the time the step waits
for its next batch while the loader's threads share the machine with the step, as in training.

Fair: every configuration starts from the same weights and queue (seed 0) and reads the same batches (epochs
0, 1, ... from the start), runs `--warmup` untimed steps, then `--steps` timed ones, each ending once the keys
are enqueued. Phases are timed back to back with perf_counter (on CUDA synchronized at every boundary), so
they add up to the wall time of the timed steps; img/s = batch x steps / that time. The phases inside
train_step are cut by wrapping the model's forward and the synthesis (the step's code is unchanged): "to
device" is the copy and memory-format change before the forward, "rest" the loss, backward, SGD and enqueue.
The queue holds random unit keys; the synthesis costs the same whatever is in it.

Variants: --amp bf16 runs the encoders under torch.autocast (similarities, synthesis, loss in fp32; backward
and SGD outside, as torch's AMP recipe); --channels-last converts the model and each batch (the conversion is
charged to "to device"). The split BN that emulates shuffle BN (bn_splits > 1) regroups the batch as [N/S,
S*C, H, W], which costs a channels_last batch two copies per BN layer: compare at --bn-splits 1 (DDP's real
shuffle BN) to see channels_last alone.
"""

import argparse
import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch

import pipeline.train.step as step
from bench.common import PhaseClock, drain, result, toy_betons, where
from pipeline.config import Params
from pipeline.data.augment import AugParams
from pipeline.data.ffcv_io import TwoViewBatch, TwoViewLoader

PHASES = ("data", "copy", "forward", "synthesis", "rest")
HEADERS = ("data", "to device", "fwd q/k", "synth", "loss+bwd+opt+queue")


def endless(loader: TwoViewLoader) -> Iterator[TwoViewBatch]:
    """Epochs 0, 1, 2, ... back to back: every configuration sees the same batches in the same order."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def lapped(fn, clock: PhaseClock, before: str, after: str):
    """fn wrapped so that the time up to its call is charged to `before` and its own time to `after`, while
    train_step itself runs unchanged."""

    def wrapper(*args, **kwargs):
        clock.lap(before)
        out = fn(*args, **kwargs)
        clock.lap(after)
        return out

    return wrapper


def run(p: Params, loader: TwoViewLoader, device: torch.device, amp: bool, channels_last: bool, warmup: int,
        steps: int) -> dict[str, float]:
    """Seconds per phase summed over `steps` timed calls of step.train_step for the method in p.pretrain."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    setup = step.StepSetup(device, amp, memory_format)
    state = step.new_state(p, step.build_model(p), setup)
    state.model.train()
    state.epoch = p.pretrain.hard_start_epoch - 1  # epochs finished: synthetic negatives on, as after the warm-up
    clock = PhaseClock(PHASES, device)
    batches = endless(loader)
    model_forward = lapped(state.model.forward, clock, "copy", "forward")  # the copy happens just before it
    with (mock.patch.object(state.model, "forward", model_forward),
          mock.patch.object(step, "synthetic_negatives", lapped(step.synthetic_negatives, clock, "rest",
                                                                     "synthesis"))):
        for i in range(warmup + steps):
            if i == warmup:
                clock.start()
            batch = next(batches)
            clock.lap("data")
            step.train_step(state, batch, setup, p.pretrain)
            clock.lap("rest")
    drain(batches, -(warmup + steps) % len(loader))  # to the end of the epoch in progress, then leave it
    batches.close()
    return clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--methods", nargs="+", default=["moco", "mochi", "synco"], choices=["moco", "mochi", "synco"])
    parser.add_argument("--amp", choices=["bf16"], help="also time each method under bf16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="also time each method in channels_last")
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--queue-size", type=int, default=4096, help="K; a multiple of the batch size")
    parser.add_argument("--bn-splits", type=int, default=Params().pretrain.bn_splits,
                        help="split-BN groups (shuffle-BN emulation)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--workers", type=int, default=2, help="ffcv loader threads")
    parser.add_argument("--images", type=int, default=512, help="toy training images (8 classes)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here")
    if args.queue_size % args.batch_size or args.batch_size % args.bn_splits:
        parser.error("--queue-size must be a multiple of --batch-size, and --batch-size of --bn-splits")
    device = torch.device(args.device)
    variants = {"fp32": (False, False)}
    if args.amp or args.channels_last:
        name = "+".join(n for n, on in (("bf16", args.amp), ("channels_last", args.channels_last)) if on)
        variants[name] = (bool(args.amp), args.channels_last)

    p = Params()
    p.model.arch = args.arch
    pt = p.pretrain
    pt.res, pt.batch_size, pt.queue_size, pt.bn_splits = args.res, args.batch_size, args.queue_size, args.bn_splits
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_step_") as tmp:
        beton = toy_betons(Path(tmp), 8, args.images // 8, 0, args.res, args.workers)["train"]
        aug = AugParams(crop_scale=tuple(pt.crop_scale), blur_sigma=tuple(pt.blur_sigma))
        loader = TwoViewLoader(beton, args.batch_size, args.res, aug, args.workers, seed=pt.seed)
        print(f"{args.arch} at {args.res} px, batch {args.batch_size}, K {args.queue_size}, "
              f"bn_splits {args.bn_splits}, {len(loader) * args.batch_size} toy images, "
              f"{args.workers} loader threads, torch {torch.get_num_threads()} threads, on {where(device)}; "
              f"{args.warmup} warm-up + {args.steps} timed steps per row; MoCHi (N, s, s') = "
              f"({pt.mochi.n_hard}, {pt.mochi.s}, {pt.mochi.s_prime}), SynCo N {pt.synco.n_hard} "
              f"counts {pt.synco.counts}")
        for method in args.methods:
            pt.method = method
            for variant, (amp, channels_last) in variants.items():
                seconds[method, variant] = run(p, loader, device, amp, channels_last, args.warmup, args.steps)

    images = args.batch_size * args.steps
    rate = {key: images / sum(s.values()) for key, s in seconds.items()}
    base = args.methods[0]
    print(f"| method | variant | img/s | x {base} | x fp32 | " + " | ".join(HEADERS) + " |  (ms per step)")
    print("|---|---|---:|---:|---:|" + "---:|" * len(PHASES))
    rows = []
    for (method, variant), s in seconds.items():
        ms = {phase: 1e3 * t / args.steps for phase, t in s.items()}
        vs_base, vs_fp32 = rate[method, variant] / rate[base, variant], rate[method, variant] / rate[method, "fp32"]
        print(f"| {method} | {variant} | {rate[method, variant]:.1f} | {vs_base:.2f} | {vs_fp32:.2f} | "
              + " | ".join(f"{ms[phase]:.1f}" for phase in PHASES) + " |")
        rows.append({"method": method, "variant": variant, "images_per_s": round(rate[method, variant], 2),
                     f"ratio_to_{base}": round(vs_base, 3), "ratio_to_fp32": round(vs_fp32, 3),
                     "ms": {phase: round(v, 2) for phase, v in ms.items()}})
    result("pretrain_step", device=where(device), arch=args.arch, res=args.res, batch_size=args.batch_size,
           queue_size=args.queue_size, bn_splits=args.bn_splits, steps=args.steps, warmup=args.warmup, rows=rows)


if __name__ == "__main__":
    main()
