"""Exact-line dedup and MinHash near-duplicate detection on real text with planted duplicates."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from tests.conftest import FIXTURES, REPO

from lmrun.curation.dedup import (count_lines, exact_line_deduplication, find_near_duplicates, hash_params, jaccard,
                                  minhash_deduplication, minhash_signature, normalize_text, remove_duplicate_lines,
                                  shingles)


def test_exact_line_deduplication(tmp_path):
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text("Home | About | Contact\nA unique first line.\n\nShared footer line\n", encoding="utf-8")
    b.write_text("Home | About | Contact\nAnother unique line.\nShared footer line\n", encoding="utf-8")
    stats = exact_line_deduplication([a, b], tmp_path / "out")
    assert (tmp_path / "out/a.txt").read_text() == "A unique first line.\n\n"
    assert (tmp_path / "out/b.txt").read_text() == "Another unique line.\n"
    assert stats == {"files": 2, "lines_removed": 4}


def test_remove_duplicate_lines_keeps_paragraph_breaks():
    counts = count_lines(["x\n\ndup\n\ny", "dup"])
    assert remove_duplicate_lines("x\n\ndup\n\ny", counts) == ("x\n\ny", 1)


def test_normalize_text():
    assert normalize_text("  Héllo,\tWÖRLD!  It's  naïve_ok. ") == "hello world it s naive ok"


def test_signature_estimates_jaccard():
    text = (FIXTURES / "enc_wikitext2_valid_slice.txt").read_text(encoding="utf-8")[:6000]
    words = text.split()
    other = " ".join(words[: int(len(words) * 0.7)] + ["changed"] * 50)
    s, t = shingles(text, 5), shingles(other, 5)
    a, b = hash_params(512, seed=1)
    est = float(np.mean(minhash_signature(s, a, b) == minhash_signature(t, a, b)))
    assert abs(est - jaccard(s, t)) < 0.06


def _real_documents(n: int, words_per_doc: int = 150) -> list[str]:
    sources = [(FIXTURES / "enc_wikitext2_valid_slice.txt").read_text(encoding="utf-8"),
               (REPO / "lmrun/data/corpora/tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]]
    words = " ".join(sources).split()
    return [" ".join(words[i * words_per_doc:(i + 1) * words_per_doc]) for i in range(n)]


def _perturb(doc: str, rng: random.Random, frac: float) -> str:
    words = doc.split()
    for i in rng.sample(range(len(words)), int(len(words) * frac)):
        words[i] = rng.choice(["lorem", "ipsum", "dolor", "amet", "elit", words[i].upper() + "!"])
    return " ".join(words)


def test_minhash_precision_recall_on_planted_near_duplicates():
    rng = random.Random(0)
    base = _real_documents(120)
    corpus = list(base)
    for i in range(0, 120, 3):  # near duplicates from tiny to large edits around the threshold
        corpus.append(_perturb(base[i], rng, rng.choice([0.0, 0.005, 0.01, 0.02, 0.04, 0.08])))
    rng.shuffle(corpus)
    sets = [shingles(d, 5) for d in corpus]
    truth = {(i, j) for i, j in itertools.combinations(range(len(corpus)), 2) if jaccard(sets[i], sets[j]) >= 0.8}
    assert 20 <= len(truth) <= 40  # some planted pairs fall below the threshold on purpose
    res = find_near_duplicates(lambda: iter(corpus), num_hashes=120, num_bands=20, ngrams=5, jaccard_threshold=0.8)
    found = set(res["pairs"])
    precision = len(found & truth) / max(len(found), 1)
    recall = len(found & truth) / len(truth)
    assert precision >= 0.95 and recall >= 0.95
    # one document kept per cluster: the first in corpus order
    for cluster in res["clusters"]:
        assert all(x in res["remove"] for x in cluster[1:]) and cluster[0] not in res["remove"]
    assert len(res["remove"]) == sum(len(c) - 1 for c in res["clusters"])


def test_minhash_deduplication_files(tmp_path):
    docs = _real_documents(4, 200)
    names = []
    for i, d in enumerate(docs + [docs[1].replace(".", "!").upper(), docs[2]]):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(d, encoding="utf-8")
        names.append(p)
    res = minhash_deduplication(names, num_hashes=120, num_bands=20, ngrams=5, jaccard_threshold=0.8,
                                output_dir=tmp_path / "out")
    assert res["kept"] == ["doc0.txt", "doc1.txt", "doc2.txt", "doc3.txt"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == res["kept"]
    with pytest.raises(ValueError):
        find_near_duplicates(lambda: iter(docs), num_hashes=100, num_bands=7)
