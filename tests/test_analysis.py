"""The paper analyses against loop references."""

import math

import torch
import torch.nn.functional as F

from pipeline.analysis import alignment, class_distance_ratio, false_negatives_by_rank, hardness, uniformity


def test_alignment_and_uniformity_match_loops():
    torch.manual_seed(0)
    x, y = F.normalize(torch.randn(12, 5), dim=1), F.normalize(torch.randn(12, 5), dim=1)
    assert math.isclose(alignment(x, y), sum(float((x[i] - y[i]).norm() ** 2) for i in range(12)) / 12, rel_tol=1e-5)
    terms = [math.exp(-2 * float((x[i] - x[j]).norm() ** 2)) for i in range(12) for j in range(i + 1, 12)]
    assert math.isclose(uniformity(x), math.log(sum(terms) / len(terms)), rel_tol=1e-5)


def test_hardness_is_mean_of_sorted_negative_probabilities():
    torch.manual_seed(0)
    l_pos, l_neg = torch.rand(3), torch.rand(3, 10)
    h = hardness(l_pos, l_neg, T=0.2, top=4)
    rows = []
    for b in range(3):
        logits = [float(l_pos[b])] + [float(v) for v in l_neg[b]]
        z = sum(math.exp(v / 0.2) for v in logits)
        rows.append(sorted((math.exp(v / 0.2) / z for v in logits[1:]), reverse=True)[:4])
    ref = [sum(r[i] for r in rows) / 3 for i in range(4)]
    assert torch.allclose(h, torch.tensor(ref), rtol=1e-5)
    assert (h[:-1] >= h[1:]).all()


def test_class_distance_ratio_matches_loop_and_drops_singletons():
    torch.manual_seed(0)
    x, labels = torch.randn(7, 3), torch.tensor([0, 0, 0, 1, 1, 2, 1])
    r = class_distance_ratio(x, labels)
    ref = []
    for i in range(7):
        intra = [float((x[i] - x[j]).norm()) for j in range(7) if j != i and labels[j] == labels[i]]
        inter = [float((x[i] - x[j]).norm()) for j in range(7) if labels[j] != labels[i]]
        if intra:
            ref.append((sum(inter) / len(inter)) / (sum(intra) / len(intra)))
    assert torch.allclose(r, torch.tensor(ref), rtol=1e-4)


def test_false_negatives_by_rank_matches_loop_reference():
    torch.manual_seed(0)
    B, K, top = 6, 20, 5
    l_neg = torch.randn(B, K)
    labels = torch.randint(0, 3, (B,))
    queue_labels = torch.randint(-1, 3, (K,))  # some slots not filled yet
    same, seen = false_negatives_by_rank(l_neg, labels, queue_labels, top)
    ref_same, ref_seen = [0] * top, [0] * top
    for b in range(B):
        order = sorted(range(K), key=lambda j: -l_neg[b, j].item())[:top]
        for r, j in enumerate(order):
            if queue_labels[j] >= 0:
                ref_seen[r] += 1
                ref_same[r] += int(queue_labels[j] == labels[b])
    assert same.tolist() == ref_same and seen.tolist() == ref_seen
