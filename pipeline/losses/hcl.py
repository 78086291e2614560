"""Hard-negative contrastive loss, HCL (Robinson et al., "Contrastive Learning with Hard Negative
Samples", ICLR 2021).

Reference code: github.com/joshr17/HCL image/main.py (estimator='hard').
"""

import torch
from torch import Tensor

from pipeline.losses.dcl import debiased


def hcl(pos: Tensor, neg: Tensor, T: float, tau_plus: float, beta: float) -> Tensor:
    """The hard-sampling objective of Robinson et al. (Sec. 3): DCL's debiased loss with the mean over
    negatives taken under q_beta(x-) ~ e^{beta f(x).f(x-)} p(x-), estimated by self-normalised importance
    weights on the N present negatives (Sec. 3, "efficient importance sampling"):

        w_i = e^{beta neg_i/T} / sum_j e^{beta neg_j/T},
        g   = max( (sum_i w_i e^{neg_i/T} - tau_plus e^{pos/T}) / (1 - tau_plus),  e^{-1/T} ),
        L   = -log( e^{pos/T} / (e^{pos/T} + N g) ).

    Same as the reference code, where imp = e^{beta neg/T} and sum(imp e^{neg/T}) / mean(imp) =
    N sum_i w_i e^{neg_i/T}: the temperature is inside the weights, the weights are not detached, the
    positive term is not reweighted (one positive per query), the clamp is DCL's. beta = 0 gives DCL.
    pos [B], neg [B, M] are similarities not yet divided by T; -inf entries of neg are absent.
    """
    log_w = torch.where(neg.isfinite(), beta * neg / T, float("-inf"))  # [B, M] (0 * -inf would be nan)
    return debiased(pos, neg, T, tau_plus, torch.softmax(log_w, dim=1))
