"""Anatomy of hard negatives: WordNet similarity by hardness rank and the classes synthetic points come from,
against loop references, the real WordNet files, and one real pretraining run whose classes are ImageNet ids."""

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.analysis import class_similarity_by_rank, same_class_sources, synthetic_sources
from pipeline.config import MochiParams, PretrainParams, SyncoParams
from pipeline.models.negatives import mochi, synco
from pipeline.report import write_figures
from pipeline.train.pretrain import pretrain
from pipeline.wordnet import WordNet, is_wnid
from tests.conftest import tiny_pretrain

DATA_NOUN = Path("/usr/share/wordnet/data.noun")  # Debian wordnet-base, installed by `make setup`
DOG, CAT, TENCH = "n02084071", "n02121620", "n01440764"

# a hand-made hierarchy in data.noun's format: root <- animal <- {dog <- puppy, cat}; root <- rock
#   offset lex_filenum pos w_cnt word lex_id p_cnt (symbol offset pos source/target)* | gloss
TINY_NOUNS = """\
  1 licence text, skipped
00000001 03 n 01 root 0 000 | the root
00000002 03 n 01 animal 0 001 @ 00000001 n 0000 | an animal
00000003 05 n 02 dog 0 hound 0 002 @ 00000002 n 0000 ~ 00000005 n 0000 | a dog
00000004 05 n 01 cat 0 001 @ 00000002 n 0000 | a cat
00000005 05 n 01 puppy 0 001 @i 00000003 n 0000 | a young dog
00000006 03 n 01 rock 0 001 @ 00000001 n 0000 | a rock
"""


def test_wu_palmer_on_a_hand_made_hierarchy(tmp_path: Path):
    (tmp_path / "data.noun").write_text(TINY_NOUNS)
    wn = WordNet(tmp_path / "data.noun")
    # 2 d / (len_a + len_b + 2 d), d = depth of the deepest common hypernym counted from 1 at the root
    assert wn.wup("n00000003", "n00000004") == pytest.approx(2 * 2 / (1 + 1 + 2 * 2))  # via animal
    assert wn.wup("n00000005", "n00000004") == pytest.approx(2 * 2 / (2 + 1 + 2 * 2))  # instance hypernym @i
    assert wn.wup("n00000005", "n00000006") == pytest.approx(2 * 1 / (3 + 1 + 2 * 1))  # only the root
    assert wn.wup("n00000003", "n00000003") == 1.0
    m = wn.wup_matrix(["n00000003", "n00000004", "n00000006"])
    assert torch.equal(m, m.T) and torch.equal(m.diag(), torch.ones(3))
    with pytest.raises(KeyError, match="n00000009"):
        wn.wup("n00000009", "n00000003")


def test_wordnet_files_fail_clearly(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="apt install wordnet-base"):
        WordNet(tmp_path / "nowhere" / "data.noun")
    (tmp_path / "data.noun").write_text("00000001 03 n zz root\n")
    with pytest.raises(ValueError, match=r"data.noun:1: not a WordNet data line"):
        WordNet(tmp_path / "data.noun")


def test_real_wordnet_gives_nltk_values_for_imagenet_ids():
    wn = WordNet(DATA_NOUN)
    assert len(wn.parents) == 82115  # the WordNet 3.0 noun synsets
    assert wn.wup(DOG, CAT) == pytest.approx(0.857, abs=1e-3)  # NLTK's documented dog.wup_similarity(cat)
    assert wn.wup(DOG, TENCH) < wn.wup(DOG, CAT) < 1.0
    imagenet100 = (Path(__file__).parents[1] / "presets/imagenet100.txt").read_text().split()
    assert all(is_wnid(c) for c in imagenet100) and not is_wnid("class_03")
    assert wn.wup_matrix(imagenet100).shape == (100, 100)  # every IN-100 class is a WordNet 3.0 noun


def test_class_similarity_by_rank_matches_loop_reference():
    torch.manual_seed(0)
    B, K, C, top = 5, 16, 4, 6
    l_neg, labels = torch.randn(B, K), torch.randint(0, C, (B,))
    queue_labels = torch.randint(-1, C, (K,))  # -1: slot not filled yet
    sim = torch.rand(C, C)
    total, seen = class_similarity_by_rank(l_neg, labels, queue_labels, sim, top)
    ref_total, ref_seen = [0.0] * top, [0] * top
    for b in range(B):
        order = sorted(range(K), key=lambda j: -l_neg[b, j].item())[:top]
        for r, j in enumerate(order):
            if queue_labels[j] >= 0:
                ref_seen[r] += 1
                ref_total[r] += sim[labels[b], queue_labels[j]].item()
    assert torch.allclose(total, torch.tensor(ref_total)) and seen.tolist() == ref_seen


def test_same_class_sources_matches_loop_reference():
    torch.manual_seed(0)
    B, K, m = 6, 12, 7
    labels, queue_labels = torch.randint(0, 3, (B,)), torch.randint(-1, 3, (K,))
    n_j, n_i = torch.randint(0, K, (B, m)), torch.randint(0, K, (B, m))
    every, some, seen = 0, 0, 0
    for b in range(B):
        for c in range(m):
            src = [queue_labels[n_j[b, c]].item(), queue_labels[n_i[b, c]].item()]
            if min(src) >= 0:
                seen += 1
                every += all(s == labels[b] for s in src)
                some += any(s == labels[b] for s in src)
    assert same_class_sources([n_j, n_i], labels, queue_labels) == (every, some, seen)
    assert same_class_sources([n_j], labels, queue_labels)[0] == same_class_sources([n_j], labels, queue_labels)[1]


def test_synthetic_sources_name_each_type_with_the_negatives_it_mixes():
    torch.manual_seed(0)
    q, queue = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(20, 8), dim=1)
    pt = PretrainParams(method="mochi", mochi=MochiParams(n_hard=5, s=4, s_prime=2))
    _, info = mochi(q, queue, 5, 4, 2, return_info=True)
    types = synthetic_sources(info, pt)
    assert {k: [t.shape for t in v] for k, v in types.items()} == {
        "MoCHi h (n_i+n_j)": [(3, 4), (3, 4)], "MoCHi h' (q+n_j)": [(3, 2)]}
    pt = PretrainParams(method="synco", synco=SyncoParams(n_hard=5, counts=[2, 0, 3, 1, 1, 1]))
    _, info = synco(q, queue, 5, (2, 0, 3, 1, 1, 1), return_info=True)
    types = synthetic_sources(info, pt)
    assert list(types) == ["SynCo 1 interpolated", "SynCo 3 mixup", "SynCo 4 noise", "SynCo 5 perturbed",
                           "SynCo 6 adversarial"]  # type 2 switched off
    assert [t.shape for t in types["SynCo 3 mixup"]] == [(3, 3), (3, 3)]
    top = info["top"]  # every source is one of the query's top N
    assert all(torch.isin(s[b], top[b]).all() for v in types.values() for s in v for b in range(3))


def test_pretraining_on_imagenet_ids_writes_wordnet_and_synthetic_source_analyses(betons, tmp_path: Path):
    p, (out, state, live, _) = tiny_pretrain(tmp_path, method="mochi", hard_start_epoch=1)
    analysis = tmp_path / "analysis/pretrain"  # where write_figures looks
    metrics = pretrain(p, *betons, out, state, live, analysis, class_names=[DOG, CAT, TENCH])  # ant, bee, cat
    assert 0 < metrics["wup_top10"] < 1 and 0 <= metrics["synthetic_from_false_negatives"] <= 1
    with (analysis / "wordnet.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == list(range(1, 9))  # queue_size 8
    wn = WordNet(DATA_NOUN)
    pair_values = {1.0, wn.wup(DOG, CAT), wn.wup(DOG, TENCH), wn.wup(CAT, TENCH)}
    assert all(min(pair_values) - 1e-4 <= float(r["wup_similarity"]) <= 1 for r in rows)
    with (analysis / "synthetic_sources.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["type"] for r in rows] == ["MoCHi h (n_i+n_j)", "MoCHi h' (q+n_j)"]
    assert all(float(r["same_class_all"]) <= float(r["same_class_any"]) for r in rows)
    assert math.isclose(float(rows[1]["same_class_all"]), float(rows[1]["same_class_any"]))  # one source
    figures = write_figures(tmp_path, tmp_path / "figures")
    assert {"wordnet", "synthetic_sources"} <= set(figures)
    assert (tmp_path / "figures/wordnet.png").stat().st_size > 10_000


def test_imagenet_ids_without_the_wordnet_files_fail_before_training(betons, tmp_path: Path):
    p, (out, state, live, analysis) = tiny_pretrain(tmp_path, wordnet=str(tmp_path / "missing/data.noun"))
    with pytest.raises(FileNotFoundError, match="missing/data.noun"):
        pretrain(p, *betons, out, state, live, analysis, class_names=[DOG, CAT, TENCH])
    assert not state.exists()
    p, paths = tiny_pretrain(tmp_path, wordnet=str(tmp_path / "missing/data.noun"), epochs=1)
    metrics = pretrain(p, *betons, *paths, class_names=["ant", "bee", "cat"])  # not WordNet ids: no analysis
    assert "wup_top10" not in metrics and not (paths[3] / "wordnet.csv").exists()
