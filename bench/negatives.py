"""Cost of hard-negative synthesis and of the loss variants at IN-1k shapes, relative to plain MoCo.

    python -m bench.negatives [--device cpu|cuda] [--repeats R] [--warmup W]    (from the repo root)

One row per method: the contrastive head of one training step on fixed unit features, q [B, D]
(requires grad), k [B, D], queue [K, D] (B=256, K=65536, D=128 as in MoCo v2 on IN-1k). "fwd" is
q @ queue.T, the synthesis, the extra logits and the loss; "fwd+bwd" adds the backward pass to q.
Median of repeats after warm-up, the methods taken in turn within every repeat so that load from other
processes hits them alike; ratios are to the MoCo row (q @ queue.T, cat, cross-entropy) of the same
run. On CUDA, "peak MiB" is the peak allocated memory of a fwd+bwd step. Ends with a RESULT {json} line.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.common import result
from pipeline.losses import dcl, drop_hardest, hcl, infonce
from pipeline.models.negatives import mochi, synco, synthetic_logits

B, K, D, T = 256, 65536, 128, 0.2


def positive(q, k):
    return torch.einsum("bd,bd->b", q, k)  # [B]


def moco(q, k, queue):
    return infonce(positive(q, k), q @ queue.T, T)


def with_mochi(n_hard: int, s: int, s_prime: int) -> Callable:
    def step(q, k, queue):
        l_neg = q @ queue.T  # [B, K]
        h = mochi(q, queue, n_hard, s, s_prime, logits=l_neg)  # [B, s + s', D]
        return infonce(positive(q, k), torch.cat([l_neg, synthetic_logits(q, h)], dim=1), T)
    return step


def with_synco(q, k, queue):
    l_neg = q @ queue.T  # [B, K]
    h = synco(q, queue, 1024, (256, 256, 256, 64, 64, 64), logits=l_neg)  # [B, 960, D]
    return infonce(positive(q, k), torch.cat([l_neg, synthetic_logits(q, h)], dim=1), T)


METHODS = {
    "MoCo v2 (InfoNCE)": moco,
    "MoCHi (512, 1024, 512)": with_mochi(512, 1024, 512),
    "MoCHi (128, 1024, 512)": with_mochi(128, 1024, 512),
    "SynCo (1024; 3x256, 3x64)": with_synco,
    "DCL (tau+ 0.01)": lambda q, k, queue: dcl(positive(q, k), q @ queue.T, T, 0.01),
    "HCL (tau+ 0.01, beta 1)": lambda q, k, queue: hcl(positive(q, k), q @ queue.T, T, 0.01, 1.0),
    "InfoNCE, 0.1% hardest dropped": lambda q, k, queue: infonce(
        positive(q, k), drop_hardest(q @ queue.T, 0.001), T),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 on cuda, 5 on cpu")
    parser.add_argument("--warmup", type=int, default=None, help="default: 5 on cuda, 1 on cpu")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    repeats = args.repeats or (20 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)

    torch.manual_seed(0)
    q = F.normalize(torch.randn(B, D, device=args.device), dim=1).requires_grad_()  # [B, D]
    k = F.normalize(torch.randn(B, D, device=args.device), dim=1)  # [B, D]
    queue = F.normalize(torch.randn(K, D, device=args.device), dim=1)  # [K, D]

    def seconds(method: Callable, backward: bool) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        q.grad = None
        loss = method(q, k, queue)
        if backward:
            loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    fwd = {name: [] for name in METHODS}
    both = {name: [] for name in METHODS}
    peak = dict.fromkeys(METHODS, "-")
    for r in range(warmup + repeats):
        for name, method in METHODS.items():
            t_fwd = seconds(method, backward=False)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t_both = seconds(method, backward=True)
            if cuda:
                peak[name] = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}"
            if r >= warmup:
                fwd[name].append(t_fwd)
                both[name].append(t_both)

    base = "MoCo v2 (InfoNCE)"
    where = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"B={B} K={K} D={D} on {where}, torch {torch.__version__}; "
          f"median of {repeats} after {warmup} warm-up")
    print("| method | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio | peak MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = {}
    for name in METHODS:
        f, b = statistics.median(fwd[name]), statistics.median(both[name])
        f_ratio, b_ratio = f / statistics.median(fwd[base]), b / statistics.median(both[base])
        print(f"| {name} | {f * 1e3:.1f} | {f_ratio:.2f} | {b * 1e3:.1f} | {b_ratio:.2f} | {peak[name]} |")
        rows[name] = {"fwd_ms": round(f * 1e3, 2), "fwd_ratio": round(f_ratio, 3), "fwd_bwd_ms": round(b * 1e3, 2),
                      "fwd_bwd_ratio": round(b_ratio, 3)}
    result("negatives", device=where, B=B, K=K, D=D, repeats=repeats, rows=rows)


if __name__ == "__main__":
    main()
