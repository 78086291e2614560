"""Wu-Palmer similarity between ImageNet classes over WordNet 3.0, read offline from the dictionary files that
Debian's `wordnet-base` installs (/usr/share/wordnet/data.noun).

An ImageNet class id such as n02084071 is the noun synset at byte offset 02084071 of data.noun. Wu-Palmer:
wup(a, b) = 2 d / (len(a, c) + len(b, c) + 2 d), with c the deepest common hypernym (the one with the largest
shortest path to the root, ties broken by the longest path), d = 1 + its longest path to the root and len
the shortest hypernym path to it; these are NLTK's conventions, so dog/cat = 0.857 as in its documentation.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import torch

WNID = re.compile(r"n(\d{8})")


def is_wnid(name: str) -> bool:
    """True for an ImageNet-style WordNet noun id (n + 8 digits)."""
    return WNID.fullmatch(name) is not None


class WordNet:
    """The noun hypernym graph (hypernyms and instance hypernyms) of one data.noun file."""

    def __init__(self, data_noun: str | Path):
        path = Path(data_noun)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: WordNet data.noun not found (Debian: apt install wordnet-base)")
        self.parents: dict[int, tuple[int, ...]] = {}
        with path.open(encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if line.startswith("  "):  # the licence header
                    continue
                fields = line.split(" | ", 1)[0].split()  # offset lex_filenum pos w_cnt (word lex_id)* p_cnt ...
                try:
                    p_at = 4 + 2 * int(fields[3], 16)
                    pointers = fields[p_at + 1:p_at + 1 + 4 * int(fields[p_at])]  # (symbol offset pos src/tgt)*
                    self.parents[int(fields[0])] = tuple(int(pointers[i + 1]) for i in range(0, len(pointers), 4)
                                                         if pointers[i] in ("@", "@i"))
                except (IndexError, ValueError) as e:
                    raise ValueError(f"{path}:{n}: not a WordNet data line ({e})") from None
        self._up = cache(self._up_uncached)
        self._depth = cache(self._depth_uncached)

    def offset(self, wnid: str) -> int:
        m = WNID.fullmatch(wnid)
        if m is None or int(m[1]) not in self.parents:
            raise KeyError(f"{wnid!r} is not a WordNet 3.0 noun id (n + the 8-digit offset in data.noun)")
        return int(m[1])

    def _up_uncached(self, s: int) -> dict[int, int]:
        """Shortest hypernym-path length from s to each of its ancestors (s itself at 0)."""
        dist, frontier = {s: 0}, [s]
        while frontier:
            nxt = []
            for a in frontier:
                for p in self.parents[a]:
                    if p not in dist:
                        dist[p] = dist[a] + 1
                        nxt.append(p)
            frontier = nxt
        return dist

    def _depth_uncached(self, s: int) -> tuple[int, int]:
        """(shortest, longest) hypernym-path length from s to the root."""
        ps = self.parents[s]
        if not ps:
            return 0, 0
        depths = [self._depth(p) for p in ps]
        return 1 + min(d[0] for d in depths), 1 + max(d[1] for d in depths)

    def wup(self, a: str, b: str) -> float:
        """Wu-Palmer similarity of two noun ids in (0, 1]; 1 for the same synset."""
        up_a, up_b = self._up(self.offset(a)), self._up(self.offset(b))
        common = up_a.keys() & up_b.keys()  # never empty: every noun reaches entity.n.01
        c = max(common, key=self._depth)
        d = self._depth(c)[1] + 1
        return 2 * d / (up_a[c] + up_b[c] + 2 * d)

    def wup_matrix(self, wnids: list[str]) -> torch.Tensor:
        """[C, C] Wu-Palmer similarity between the classes, in label order."""
        C = len(wnids)
        sim = torch.ones(C, C)  # [C, C]
        for i in range(C):
            for j in range(i + 1, C):
                sim[i, j] = sim[j, i] = self.wup(wnids[i], wnids[j])
        return sim
