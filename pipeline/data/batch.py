"""The batch the pretraining loader hands to the training step: CPU tensors, no ffcv needed to import it
(bench.gpu_smoke builds batches of synthetic tensors on machines without ffcv)."""

from typing import NamedTuple

from torch import Tensor


class TwoViewBatch(NamedTuple):
    """Two aug+ views of each image, its class and its dataset index (the key of its random draws)."""

    im_q: Tensor  # [B, 3, res, res] float32, normalised
    im_k: Tensor  # [B, 3, res, res]
    label: Tensor  # [B] int64
    index: Tensor  # [B] int64 position in the .beton
