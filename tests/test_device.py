"""Device placement without a GPU: the forward paths of training, the analysis pass, and linear-eval/kNN
feature extraction run on fake "cuda" tensors (pipeline.compat.torch.fake_cuda), fed by the real ffcv
loaders. A CPU tensor meeting a cuda one raises FakeTensorDeviceMismatchError, the error a GPU job would
hit. Backward needs a real GPU (bench.gpu_smoke); fp32 similarities under bf16 autocast are checked on
the CPU, where autocast runs."""

import math
from dataclasses import replace

import pytest
import torch

from pipeline.analysis import collect
from pipeline.compat.torch import fake_cuda, is_fake
from pipeline.data.augment import AugParams
from pipeline.data.ffcv_io import EvalLoader, TwoViewLoader
from pipeline.models.backbone import resnet
from pipeline.train.evaluate import extract_batch, extract_features
from pipeline.train.knn import knn_predict
from pipeline.train.pretrain import fill_queue
from pipeline.train.step import StepSetup, build_model, forward_loss, new_state, train_step
from tests.conftest import tiny_pretrain

CUDA = torch.device("cuda")
METHODS = [  # every path through step_loss: plain, each synthesis, a loss variant, the false-negative drop
    dict(method="moco"),
    dict(method="mochi", drop_hardest=0.25),
    dict(method="synco", loss="hcl"),
]


class Prefetched:
    """One epoch of a real loader, read before entering fake mode (ffcv allocates its buffers as torch
    tensors, which fake mode would make fake): the code under test gets the CPU batches a loader gives."""

    def __init__(self, loader):
        self.batches = list(loader)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)


def _loader(p, beton, **kw) -> Prefetched:
    pt = p.pretrain
    return Prefetched(TwoViewLoader(beton, pt.batch_size, pt.res, AugParams(), p.data.num_workers, seed=pt.seed, **kw))


@pytest.mark.parametrize("options", METHODS, ids=lambda o: "+".join(map(str, o.values())))
def test_train_step_forward_and_enqueue_run_on_the_device(betons, tmp_path, options):
    p, _ = tiny_pretrain(tmp_path, hard_start_epoch=1, **options)
    p.pretrain.mochi = replace(p.pretrain.mochi, n_hard=4, s=2, s_prime=2)
    p.pretrain.synco = replace(p.pretrain.synco, n_hard=4)
    loader = _loader(p, betons[0])
    model = build_model(p)  # a real module, moved onto the fake device by new_state as in pretrain()
    with fake_cuda():
        setup = StepSetup(CUDA, memory_format=torch.channels_last)
        state = new_state(p, model, setup)
        fill_queue(state.model, loader, setup)
        batch = next(iter(loader))  # CPU tensors, as the loader hands them over
        loss, k, figures = forward_loss(state, batch, setup, p.pretrain)
        assert is_fake(loss) and loss.device.type == "cuda" and loss.dtype == torch.float32
        assert figures["hits"].device.type == "cuda" and k.shape == (p.pretrain.batch_size, p.pretrain.dim)
        state.model.dequeue_and_enqueue(k, batch.label.to(CUDA))


def test_analysis_pass_runs_on_the_device(betons, tmp_path):
    p, _ = tiny_pretrain(tmp_path, method="synco", hard_start_epoch=1)
    p.pretrain.synco = replace(p.pretrain.synco, n_hard=4)
    val = _loader(p, betons[1], drop_last=False)
    model = build_model(p)
    with fake_cuda():
        model = model.to(CUDA)
        sums = collect(model, val, p.pretrain, CUDA, wup=torch.eye(3))  # the WordNet matrix is built on the CPU
        tensors = [v for v in sums.values() if isinstance(v, torch.Tensor)]
        tensors += [t for counts in sums["sources"].values() for t in counts]
        assert tensors and all(t.device.type == "cuda" for t in tensors)


def test_lineval_and_knn_features_and_search_run_on_the_device(betons):
    train, val = (Prefetched(EvalLoader(b, 4, 16, 1, train_aug=False)) for b in betons)
    x, _ = next(iter(EvalLoader(betons[0], 4, 16, 1, train_aug=True)))  # linear eval's augmented training batch
    backbone = resnet("resnet18")
    with fake_cuda():
        backbone.to(CUDA)  # as linear_eval and knn_features do
        train_f, train_y = extract_features(backbone, train, "train", CUDA)
        val_f, val_y = extract_features(backbone, val, "val", CUDA)
        assert {t.device.type for t in (train_f, train_y, val_f, val_y)} == {"cuda"}
        scores = knn_predict(train_f, train_y, val_f, num_classes=3, k=5, T=0.07, chunk_bytes=4 * 2 * (12 + 5 * 3))
        assert scores.device.type == "cuda" and scores.shape == (6, 3)  # 3 chunks of 2 val images
        assert extract_batch(backbone, x, CUDA).device.type == "cuda"


def test_similarities_synthesis_and_loss_are_fp32_under_bf16_autocast(betons, tmp_path):
    """On the CPU, where autocast runs: the encoders in bf16, everything from q and k on in fp32."""
    for options in METHODS:
        p, _ = tiny_pretrain(tmp_path, hard_start_epoch=1, **({"loss": "dcl"} | options))
        p.pretrain.mochi = replace(p.pretrain.mochi, n_hard=4, s=2, s_prime=2)
        p.pretrain.synco = replace(p.pretrain.synco, n_hard=4)
        setup = StepSetup(torch.device("cpu"), bf16=True)
        state = new_state(p, build_model(p), setup)
        batch = next(iter(_loader(p, betons[0])))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = state.model(batch.im_q, batch.im_k)
        assert {out[name].dtype for name in ("q", "k", "l_pos", "l_neg")} == {torch.float32}
        loss, _, _ = forward_loss(state, batch, setup, p.pretrain)
        assert loss.dtype == torch.float32
        figures = train_step(state, batch, setup, p.pretrain)
        assert math.isfinite(figures["loss"]) and state.step == 1


def test_colour_ops_in_the_step_match_the_loader_and_run_on_the_device(betons, tmp_path):
    """data.augment_device: the loader hands over uint8 crops and indices, train_step makes the views where it
    runs. On the CPU the loss equals the one from the loader's own views (float rounding apart); with fake
    cuda, the colour ops, the step and the enqueue stay on the device."""
    # plain BN over the batch: split BN's groups of 2 normalise 1x1 maps of 2 samples, where a 1e-6 change of
    # an input can move the loss by 1e-2
    p, _ = tiny_pretrain(tmp_path, method="mochi", hard_start_epoch=1, bn_splits=1)
    p.pretrain.mochi = replace(p.pretrain.mochi, n_hard=4, s=2, s_prime=2)
    pt = p.pretrain
    on_loader = next(iter(TwoViewLoader(betons[0], pt.batch_size, pt.res, AugParams(), 1, seed=pt.seed)))
    deferred = TwoViewLoader(betons[0], pt.batch_size, pt.res, AugParams(), 1, seed=pt.seed, augment_device="cuda")
    uint8 = next(iter(deferred))
    assert uint8.im_q.dtype == torch.uint8 and torch.equal(uint8.index, on_loader.index)
    model = build_model(p)
    losses = []
    for batch, augment in ((on_loader, None), (uint8, deferred.colour_augment)):
        m = build_model(p)
        m.load_state_dict(model.state_dict())
        setup = StepSetup(torch.device("cpu"), augment=augment)
        torch.manual_seed(0)  # the shuffle-BN permutation
        losses.append(forward_loss(new_state(p, m, setup), batch, setup, pt)[0].item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    with fake_cuda():
        setup = StepSetup(CUDA, augment=deferred.colour_augment)
        state = new_state(p, model, setup)
        loss, k, _ = forward_loss(state, uint8, setup, pt)
        assert loss.device.type == "cuda" and k.device.type == "cuda"
        state.model.dequeue_and_enqueue(k, uint8.label.to(CUDA))
