"""DDP on CPU (gloo, 2 processes) agrees with one process on the same global batch: the gathered queue
update and the per-query synthetic negatives (draws keyed by global query index)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.models.moco import MoCo
from pipeline.models.negatives import mochi, synco

B_GLOBAL, D, K, WORLD = 8, 16, 32, 2


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(B_GLOBAL, D, generator=g), dim=1)  # [B_global, D]
    k = F.normalize(torch.randn(B_GLOBAL, D, generator=g), dim=1)  # [B_global, D]
    return q, k


def step(model: MoCo, q: torch.Tensor, k: torch.Tensor, index: torch.Tensor) -> dict:
    """What one training step does with the queue: synthesize from it, then enqueue this step's keys."""
    queue = model.queue.clone()
    out = {
        "mochi": mochi(q, queue, 8, 4, 3, query_index=index, seed=5),
        "synco": synco(q, queue, 8, (2, 2, 2, 1, 1, 1), query_index=index, seed=5),
    }
    model.dequeue_and_enqueue(k)
    out["queue"], out["ptr"] = model.queue.clone(), model.queue_ptr.clone()
    return out


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = MoCo("resnet18", dim=D, K=K)  # same seed: the same initial queue on every rank
    q, k = global_batch()
    b = B_GLOBAL // WORLD
    mine = slice(rank * b, (rank + 1) * b)
    torch.save(step(model, q[mine], k[mine], torch.arange(B_GLOBAL)[mine]), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_process_ddp_matches_one_process(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    torch.manual_seed(0)
    single = step(MoCo("resnet18", dim=D, K=K), *global_batch(), torch.arange(B_GLOBAL))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r in ranks:  # every rank enqueued all ranks' keys, in rank order
        assert torch.equal(r["queue"], single["queue"]) and torch.equal(r["ptr"], single["ptr"])
    assert int(single["ptr"]) == B_GLOBAL
    for name in ("mochi", "synco"):  # rank r's queries get exactly the points of the one-process run
        assert torch.allclose(torch.cat([r[name] for r in ranks]), single[name], atol=1e-6), name
