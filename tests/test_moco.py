"""MoCo v2 mechanics against slow, obvious references: loss, queue update, momentum update, split BN; the
bf16 / channels_last training path."""

import copy
import math

import torch
import torch.nn.functional as F

from pipeline.config import PretrainParams
from pipeline.losses import infonce
from pipeline.models.backbone import SplitBatchNorm
from pipeline.models.moco import MoCo
from pipeline.train.pretrain import lr_at, pretrain
from pipeline.train.step import fast_paths
from tests.conftest import tiny_pretrain


def tiny_moco(**kw) -> MoCo:
    torch.manual_seed(0)
    args = dict(arch="resnet18", dim=8, K=16, m=0.9, T=0.2, mlp=True, bn_splits=1) | kw
    return MoCo(**args)


def test_step_loss_and_queue_update_match_loop_reference():
    model = tiny_moco()
    x_q, x_k = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    queue_before = model.queue.clone()
    out = model(x_q, x_k)
    q, k = out["q"], out["k"]
    # reference loss: for each query, -log softmax over [q.k+, q.queue_j ...] / T at index 0
    ref = 0.0
    for i in range(4):
        logits = [torch.dot(q[i], k[i])] + [torch.dot(q[i], queue_before[j]) for j in range(16)]
        logits = torch.stack(logits) / 0.2
        ref = ref - torch.log_softmax(logits, dim=0)[0]
    ref = ref / 4
    assert torch.allclose(infonce(out["l_pos"], out["l_neg"], 0.2), ref, atol=1e-5)
    # enqueue: rows 0..3 replaced by k (and their labels kept for the analyses), the rest untouched, pointer advanced
    model.dequeue_and_enqueue(k, torch.tensor([3, 1, 4, 1]))
    assert torch.equal(model.queue[:4], k)
    assert model.queue_labels.tolist() == [3, 1, 4, 1] + [-1] * 12
    assert torch.equal(model.queue[4:], queue_before[4:])
    assert int(model.queue_ptr) == 4
    for _ in range(3):
        model.dequeue_and_enqueue(k)
    assert int(model.queue_ptr) == 0  # wrapped around: K = 16 = 4 steps of 4


def test_features_are_unit_vectors_and_keys_carry_no_gradient():
    model = tiny_moco()
    out = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert torch.allclose(out["q"].norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(out["k"].norm(dim=1), torch.ones(4), atol=1e-5)
    assert out["q"].requires_grad and not out["k"].requires_grad and out["l_neg"].grad_fn is not None
    assert torch.allclose(model.queue.norm(dim=1), torch.ones(16), atol=1e-5)


def test_momentum_update_happens_before_the_key_forward():
    model = tiny_moco(m=0.5)
    with torch.no_grad():  # make the encoders differ
        for p in model.encoder_q.parameters():
            p.add_(0.1 * torch.randn_like(p))
    q_params = [p.clone() for p in model.encoder_q.parameters()]
    k_params = [p.clone() for p in model.encoder_k.parameters()]
    model.eval()  # eval BN: per-sample features, so the key shuffle must not change them
    x_k = torch.randn(4, 3, 32, 32)
    expected_encoder = copy.deepcopy(model.encoder_k)
    with torch.no_grad():
        for p, pq, pk in zip(expected_encoder.parameters(), q_params, k_params, strict=True):
            p.copy_(0.5 * pk + 0.5 * pq)
        expected_k = F.normalize(expected_encoder(x_k), dim=1)
    out = model(torch.randn(4, 3, 32, 32), x_k)
    for p, pq, pk in zip(model.encoder_k.parameters(), q_params, k_params, strict=True):
        assert torch.allclose(p, 0.5 * pk + 0.5 * pq)
    assert torch.allclose(out["k"], expected_k, atol=1e-5)  # unshuffled back to the input order


def test_split_batchnorm_equals_separate_bn_per_group():
    torch.manual_seed(0)
    S, C = 4, 3
    split = SplitBatchNorm(C, S)
    with torch.no_grad():
        split.weight.copy_(torch.rand(C) + 0.5)
        split.bias.copy_(torch.randn(C))
    x = torch.randn(16, C, 5, 5)
    out = split(x)
    for g in range(S):
        bn = torch.nn.BatchNorm2d(C)
        bn.load_state_dict({k: v for k, v in split.state_dict().items() if k != "num_batches_tracked"}, strict=False)
        bn.running_mean.zero_()
        bn.running_var.fill_(1)
        assert torch.allclose(out[g::S], bn(x[g::S]), atol=1e-5)  # sample n is in group n % S
    # running stats: mean over groups of each group's update
    expected_mean = 0.1 * torch.stack([x[g::S].mean(dim=(0, 2, 3)) for g in range(S)]).mean(0)
    assert torch.allclose(split.running_mean, expected_mean, atol=1e-6)
    split.eval()
    assert torch.allclose(split(x), F.batch_norm(x, split.running_mean, split.running_var, split.weight,
                                                 split.bias, False, 0.0, split.eps), atol=1e-6)


def test_split_batchnorm_takes_channels_last_input():
    torch.manual_seed(0)
    plain, fast = SplitBatchNorm(3, 4), SplitBatchNorm(3, 4)
    x = torch.randn(16, 3, 5, 5)
    out = fast(x.contiguous(memory_format=torch.channels_last))  # a view would fail: N and C are not adjacent
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, plain(x), atol=1e-6)
    assert torch.allclose(fast.running_var, plain.running_var, atol=1e-6)


def test_cosine_and_step_schedules():
    assert lr_at(1.0, 0, 10, "cosine", []) == 1.0
    assert abs(lr_at(1.0, 5, 10, "cosine", []) - 0.5) < 1e-9
    assert [lr_at(1.0, e, 10, "step", [0.6, 0.8]) for e in (5, 6, 8)] == [1.0, 0.1, 0.1 ** 2]


def test_hard_negative_warm_up_is_respected_and_synthetic_points_join_the_loss():
    from pipeline.config import PretrainParams
    from pipeline.models.negatives import mochi, synthetic_logits
    from pipeline.train.step import step_loss

    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(32, 8), dim=1)
    k = F.normalize(torch.randn(4, 8), dim=1)
    out = {"q": q, "l_pos": (q * k).sum(1), "l_neg": q @ queue.T}
    pt = PretrainParams(method="mochi", hard_start_epoch=3, temperature=0.2)
    pt.mochi.n_hard, pt.mochi.s, pt.mochi.s_prime = 8, 4, 2
    index = torch.arange(4)
    before, _, _ = step_loss(out, queue, pt, epoch=2, query_index=index)
    assert torch.allclose(before, infonce(out["l_pos"], out["l_neg"], 0.2))  # warm-up: real negatives only
    after, hits, hits_all = step_loss(out, queue, pt, epoch=3, query_index=index)
    h = mochi(q.detach(), queue, 8, 4, 2, logits=out["l_neg"].detach(), query_index=index, seed=pt.seed)
    neg = torch.cat([out["l_neg"], synthetic_logits(q, h)], dim=1)  # [4, 32 + 6]
    assert torch.allclose(after, infonce(out["l_pos"], neg, 0.2))
    assert after > before and bool((hits_all <= hits).all())
    after.backward()
    assert q.grad is not None  # the query gets gradient through the synthetic logits, the points none


def test_bf16_and_channels_last_pretraining_on_cpu_and_auto_means_gpu_only(betons, tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fast_paths(PretrainParams(), cpu) == (False, torch.contiguous_format)  # the toy run stays fp32
    assert fast_paths(PretrainParams(), cuda) == (True, torch.channels_last)
    assert fast_paths(PretrainParams(precision="fp32", memory_format="contiguous"), cuda) == (
        False, torch.contiguous_format)
    p, (out, state, live, analysis) = tiny_pretrain(tmp_path, method="synco", hard_start_epoch=1, precision="bf16",
                                                    memory_format="channels_last")
    metrics = pretrain(p, *betons, out, state, live, analysis)
    assert math.isfinite(metrics["loss"]) and metrics["steps"] == 3
    weights = torch.load(out, weights_only=True)["model"]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}  # autocast, not casts


def test_synthesis_mixes_only_what_drop_hardest_left():
    """The negatives dropped as presumed false negatives must not come back as mixing sources."""
    from pipeline.config import PretrainParams
    from pipeline.losses import drop_hardest
    from pipeline.models.negatives import mochi, synthetic_logits
    from pipeline.train.step import step_loss

    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 8), dim=1)
    queue = F.normalize(torch.randn(32, 8), dim=1)
    k = F.normalize(torch.randn(4, 8), dim=1)
    out = {"q": q, "l_pos": (q * k).sum(1), "l_neg": q @ queue.T}
    pt = PretrainParams(method="mochi", hard_start_epoch=1, drop_hardest=0.25)  # 8 of 32 dropped per query
    pt.mochi.n_hard, pt.mochi.s, pt.mochi.s_prime = 8, 16, 8
    index = torch.arange(4)
    kept = drop_hardest(out["l_neg"], 0.25)  # [4, 32], the 8 hardest at -inf
    h, info = mochi(q, queue, 8, 16, 8, logits=kept, query_index=index, seed=pt.seed, return_info=True)
    dropped = out["l_neg"].topk(8, dim=1).indices  # [4, 8]
    used = torch.cat([info["j"], info["i"]], dim=1)  # [4, 24 + 16] queue rows mixed into the synthetic points
    assert not (used[:, :, None] == dropped[:, None, :]).any()  # never a dropped negative
    loss, _, _ = step_loss(out, queue, pt, epoch=1, query_index=index)
    reference = infonce(out["l_pos"], torch.cat([kept, synthetic_logits(q, h)], dim=1), 0.2)
    assert torch.allclose(loss, reference)
