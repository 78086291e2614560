import torch
import torch.nn.functional as F

from pipeline.train.knn import knn_predict, topk_correct


def test_weighted_knn_matches_loop_reference():
    torch.manual_seed(0)
    train_f, train_y = torch.randn(50, 8), torch.randint(0, 3, (50,))
    test_f = torch.randn(7, 8)
    scores = knn_predict(train_f, train_y, test_f, 3, k=5, T=0.1, chunk_bytes=4 * 3 * (50 + 5 * 3))  # chunks of 3
    tn, sn = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    for i in range(7):
        sims = [(float(sn[i] @ tn[j]), int(train_y[j])) for j in range(50)]
        sims.sort(reverse=True)
        ref = [0.0, 0.0, 0.0]
        for s, c in sims[:5]:
            ref[c] += float(torch.exp(torch.tensor(s / 0.1)))
        assert torch.allclose(scores[i], torch.tensor(ref), rtol=1e-4)


def test_topk_correct_caps_k_at_class_count():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert topk_correct(logits, torch.tensor([1, 2]), (1, 5)) == [1, 2]
