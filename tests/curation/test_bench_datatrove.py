"""The datatrove comparison's own pieces: exact similar pairs by prefix filtering, the planted
corpus, and (when datatrove and spaCy are installed) our Gopher rules against datatrove's."""
from __future__ import annotations

import itertools

import pytest

from tests.conftest import FIXTURES, REPO

from lmrun.curation.bench_datatrove import GOPHER_PAPER, _co_cluster_pairs, exact_similar_pairs, planted_corpus
from lmrun.curation.dedup import jaccard, shingles


def _texts() -> list[str]:
    return [(FIXTURES / "enc_wikitext2_valid_slice.txt").read_text(encoding="utf-8"),
            (REPO / "lmrun/data/corpora/tinyshakespeare.txt").read_text(encoding="utf-8")[:80_000]]


def test_prefix_filter_finds_exactly_the_brute_force_pairs():
    corpus = planted_corpus(_texts(), 60, seed=3)
    assert len(corpus) == 60 + 12  # a near duplicate of every fifth passage
    sets = [shingles(t, 5) for t in corpus]
    for threshold in (0.5, 0.8):
        brute = {(i, j) for i, j in itertools.combinations(range(len(sets)), 2)
                 if jaccard(sets[i], sets[j]) >= threshold}
        assert exact_similar_pairs(sets, threshold) == brute
    assert 6 <= len(exact_similar_pairs(sets, 0.8)) <= 12  # the heavier edits fall below 0.8


def test_co_cluster_pairs_is_the_transitive_closure():
    assert _co_cluster_pairs([0, 0, 2, 0, 4, 4]) == {(0, 1), (0, 3), (1, 3), (4, 5)}


@pytest.mark.slow
def test_gopher_rules_match_datatrove_with_whitespace_words():
    """Our Gopher rules with every paper rule on against datatrove's GopherQualityFilter given
    whitespace words (the reference implementation, tokenisation matched): same decisions on
    real pages and passages, including ones each side removes."""
    pytest.importorskip("datatrove")
    pytest.importorskip("spacy")
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter

    from lmrun.curation.bench_datatrove import _WhitespaceWords
    from lmrun.curation.extract import extract_text_from_html_bytes
    from lmrun.curation.gopher import gopher_reasons

    pages = [extract_text_from_html_bytes((FIXTURES / name).read_bytes(), main_content=True)
             for name in ("cur_moby.html", "cur_pydoc_getpass.html")]
    words = " ".join(_texts()).split()
    passages = [" ".join(words[i:i + n]) for i, n in zip(range(0, 40_000, 2_000), itertools.cycle([30, 80, 400]))]
    docs = pages + passages + ["#" * 3 + " tag " * 60, "... \n" * 40 + "word " * 60, "- item one\n" * 70]
    dt = GopherQualityFilter(language=_WhitespaceWords())
    ours = [not gopher_reasons(t, **GOPHER_PAPER) for t in docs]
    theirs = [dt.filter(Document(text=t, id=str(i))) is True for i, t in enumerate(docs)]
    assert ours == theirs
    assert 0 < sum(ours) < len(docs)
