"""Pretraining wall time against dataset size (one process) and against the number of processes (1 vs 2,
DDP over gloo on localhost, the same global batch and the same cores in all), with a plot in
bench/out/scaling.png.

    python -m bench.scaling [--sizes 256 512 1024] [--processes 1 2] [--batch-size 64] [--method moco]
        [--res 64] [--warmup 2] [--workers 2] [--two-node]   (from the repo root; ends with a RESULT {json} line)

A point is one epoch of the toy set of that size (pipeline/data/toy.py, 8 classes; a smaller set is the
start of a larger one) with the training step of pipeline/train/pretrain.py (MoCo forward, step_loss,
backward, SGD, enqueue; the params' defaults otherwise, K = 256), run in freshly spawned processes (one per
rank, as tests/test_ddp.py does) that each warm up for --warmup steps on an epoch of their own, meet at a
barrier, and time the epoch to the barrier after its last step. With 2 processes each rank takes half the
global batch, half the loader threads and half the torch threads, so both
layouts use the same cores: the speed-up is that of DDP, not of more hardware. Expected: time per image
flat in the size (an epoch is linear in the data), and on a 2-core CPU a speed-up of at most 1.

--two-node adds the two-node point on the SLURM test cluster (slurm/local-cluster, SLURM_CONF set): the
2-process epoch as a job of 1 node x 2 tasks and as one of 2 nodes x 1 task, same total cores, each rank in
its node's namespaces with the rendezvous on the first node's name. The ratio two-node / one-node epoch time
is the overhead of spanning nodes, not a speed-up; on this test cluster both nodes are one host, so the
traffic still crosses loopback and the expected ratio is about 1 (the README's cluster section has the bytes
per step a real interconnect carries at 8, 16 and 64 GPUs).
"""

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from matplotlib.figure import Figure
from torch.nn.parallel import DistributedDataParallel

from bench.common import OUT, drain, result, toy_betons
from pipeline.config import Params
from pipeline.data.augment import AugParams
from pipeline.data.ffcv_io import TwoViewLoader
from pipeline.train.step import StepSetup, build_model, new_state, train_step

CLASSES = 8


def train_epoch(rank: int, world: int, init: str, beton: str, opts: dict, out: str) -> None:
    """One rank: build, warm up, then time one epoch between two barriers; rank 0 writes the figures."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    p = Params()
    pt = p.pretrain
    pt.method, pt.res, pt.batch_size = opts["method"], opts["res"], opts["batch_size"] // world
    torch.manual_seed(pt.seed)
    setup = StepSetup(torch.device("cpu"), rank=rank, world=world)
    state = new_state(p, build_model(p), setup)
    if world > 1:
        setup = StepSetup(torch.device("cpu"), rank=rank, world=world, net=DistributedDataParallel(state.model))
    state.epoch = pt.hard_start_epoch - 1  # epochs finished: synthetic negatives on, as after the warm-up
    aug = AugParams(crop_scale=tuple(pt.crop_scale), blur_sigma=tuple(pt.blur_sigma))
    # ffcv also sets torch's threads to this count at every epoch start: the ranks split the cores
    threads = max(1, opts["workers"] // world)
    torch.set_num_threads(threads)  # this rank's share of the cores, for torch and the loader alike
    loader = TwoViewLoader(Path(beton), pt.batch_size, pt.res, aug, threads, seed=pt.seed,
                           distributed=world > 1)

    (setup.net or state.model).train()
    loader.set_epoch(1 << 20)  # warm-up draws of their own
    batches = iter(loader)
    for _ in range(opts["warmup"]):
        train_step(state, next(batches), setup, pt)
    drain(batches)
    loader.set_epoch(0)
    dist.barrier()
    t0 = time.perf_counter()
    steps = 0
    for batch in loader:
        train_step(state, batch, setup, pt)
        steps += 1
    dist.barrier()
    seconds = time.perf_counter() - t0
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds, "steps": steps, "images": steps * opts["batch_size"]}))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def point(beton: Path, world: int, opts: dict, tmp: Path) -> dict:
    """Spawn `world` ranks for one timed epoch; rank 0's figures."""
    out = tmp / f"{beton.parent.name}-{world}.json"
    init = f"tcp://127.0.0.1:{free_port()}"
    mp.spawn(train_epoch, args=(world, init, str(beton), opts, str(out)), nprocs=world, join=True)
    return json.loads(out.read_text())


def slurm_rank(beton: str, opts: dict, out: str) -> None:
    """One rank of a SLURM job (submitit): the same timed epoch, rendezvous on the job's first node."""
    import submitit

    from pipeline.launch import master_addr

    env = submitit.JobEnvironment()
    init = f"tcp://{master_addr(env.hostnames)}:{20000 + int(env.job_id) % 20000}"
    train_epoch(env.global_rank, env.num_tasks, init, beton, opts, out)


def slurm_point(beton: Path, nodes: int, opts: dict, tmp: Path) -> dict:
    """The 2-process epoch as a SLURM job of `nodes` node(s) (2 tasks in all, one CPU each); rank 0's figures."""
    import submitit

    out = tmp / f"slurm-{nodes}-nodes.json"
    ex = submitit.SlurmExecutor(folder=str(tmp / "slurm" / "%j"))
    ex.update_parameters(nodes=nodes, ntasks_per_node=2 // nodes, cpus_per_task=1, time=60,
                         additional_parameters={"chdir": str(Path(__file__).resolve().parents[1])})
    job = ex.submit(slurm_rank, str(beton), opts, str(out))
    job.results()  # waits; raises with the job's error if a rank failed
    return json.loads(out.read_text()) | {"job_id": job.job_id}


def plot(by_size: dict, by_world: dict, size: int, path: Path) -> None:
    """Epoch time against size (with the line of a constant time per image) and images/s against processes;
    matplotlib's object API renders the PNG with Agg, as pipeline/report.py does."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    a, b = fig.subplots(1, 2)
    sizes = sorted(by_size)
    a.plot(sizes, [by_size[n]["seconds"] for n in sizes], "o-", label="measured")
    per_image = by_size[sizes[0]]["seconds"] / by_size[sizes[0]]["images"]
    a.plot(sizes, [per_image * by_size[n]["images"] for n in sizes], "--", label="linear from the smallest")
    a.set(xlabel="training images", ylabel="epoch wall time (s)", title="1 process")
    a.legend()
    worlds = sorted(by_world)
    b.bar([str(w) for w in worlds], [by_world[w]["images"] / by_world[w]["seconds"] for w in worlds])
    b.set(xlabel="processes (gloo DDP, same cores, same global batch)", ylabel="images/s",
          title=f"{size} images")
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024], help="training images per point")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="at the largest size")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--method", default="moco", choices=["moco", "mochi", "synco"])
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per point")
    parser.add_argument("--workers", type=int, default=2, help="ffcv loader threads in all")
    parser.add_argument("--two-node", action="store_true",
                        help="2 processes also as SLURM jobs: 1 node x 2 tasks, 2 nodes x 1 task (needs SLURM_CONF)")
    args = parser.parse_args()
    if args.two_node and not os.environ.get("SLURM_CONF"):
        parser.error("--two-node needs the test cluster: bash slurm/local-cluster/start.sh, then SLURM_CONF as printed")
    cores = len(os.sched_getaffinity(0))
    bn_splits = Params().pretrain.bn_splits
    for w in args.processes:
        if args.batch_size % (w * bn_splits):
            parser.error(f"--batch-size {args.batch_size} must split into {w} ranks of a multiple of {bn_splits} "
                         "(pretrain.bn_splits)")
    if min(args.sizes) < max(2, args.warmup) * args.batch_size:
        parser.error("every size needs at least two global batches, and --warmup of them")
    opts = {"method": args.method, "res": args.res, "batch_size": args.batch_size, "warmup": args.warmup,
            "workers": args.workers}
    largest = max(args.sizes)
    print(f"{args.method}, resnet18 at {args.res} px, global batch {args.batch_size}, {cores} cores, "
          f"{args.workers} loader and torch threads split over the ranks, one epoch per point after {args.warmup} "
          f"warm-up steps", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        tmp = Path(tmp)
        betons = {n: toy_betons(tmp / f"n{n}", CLASSES, n // CLASSES, 0, args.res, args.workers)["train"]
                  for n in sorted(set(args.sizes))}
        by_size = {n: point(betons[n], 1, opts, tmp) for n in sorted(betons)}
        by_world = {w: by_size[largest] if w == 1 else point(betons[largest], w, opts, tmp)
                    for w in sorted(set(args.processes))}
        by_nodes = {n: slurm_point(betons[largest], n, opts, tmp) for n in (1, 2)} if args.two_node else {}

    smallest = min(by_size)
    ms_per_image = {n: 1e3 * r["seconds"] / r["images"] for n, r in by_size.items()}
    print("| images | processes | steps | wall s | ms/image | ms/image ratio to the smallest |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, r in by_size.items():
        print(f"| {r['images']} | 1 | {r['steps']} | {r['seconds']:.1f} | {ms_per_image[n]:.1f} | "
              f"{ms_per_image[n] / ms_per_image[smallest]:.2f} |")
    for w, r in by_world.items():
        if w > 1:
            print(f"| {r['images']} | {w} | {r['steps']} | {r['seconds']:.1f} | {1e3 * r['seconds'] / r['images']:.1f} "
                  "| |")
    speedup = {w: by_world[min(by_world)]["seconds"] / r["seconds"] for w, r in by_world.items()}
    for w, s in speedup.items():
        if w != min(by_world):
            print(f"speed-up {w} vs {min(by_world)} processes at {largest} images: {s:.2f}x")
    if by_nodes:
        print("| SLURM job | steps | wall s | ms/image |")
        print("|---|---:|---:|---:|")
        for n, r in by_nodes.items():
            print(f"| {n} node(s) x {2 // n} task(s) (job {r['job_id']}) | {r['steps']} | {r['seconds']:.1f} | "
                  f"{1e3 * r['seconds'] / r['images']:.1f} |")
        print(f"two-node / one-node epoch time, 2 processes at {largest} images: "
              f"{by_nodes[2]['seconds'] / by_nodes[1]['seconds']:.2f}")
    OUT.mkdir(exist_ok=True)
    plot(by_size, by_world, largest, OUT / "scaling.png")
    print(f"plot: {OUT / 'scaling.png'}")
    result("scaling", method=args.method, res=args.res, batch_size=args.batch_size, cores=cores, workers=args.workers,
           by_size={str(n): r for n, r in by_size.items()}, by_processes={str(w): r for w, r in by_world.items()},
           ms_per_image_ratio_to_smallest={str(n): round(v / ms_per_image[smallest], 3)
                                           for n, v in ms_per_image.items()},
           speedup={str(w): round(s, 3) for w, s in speedup.items()},
           by_slurm_nodes={str(n): r for n, r in by_nodes.items()},
           two_node_over_one_node=round(by_nodes[2]["seconds"] / by_nodes[1]["seconds"], 3) if by_nodes else None)


if __name__ == "__main__":
    main()
