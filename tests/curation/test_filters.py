"""Harmful-content classifiers, the Gopher rules at their boundaries, the quality classifier."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import FIXTURES, REPO

from lmrun.curation.gopher import gopher_quality_filter, gopher_reasons
from lmrun.curation.harmful import classify_nsfw, classify_toxic_speech, harmful_probability
from lmrun.curation.quality import (QualityModel, classify_quality, features, shuffle_blocks,
                                    train_quality_classifier, training_chunks)
from lmrun.errors import DataError, FormatError


def test_toxic_speech():
    label, score = classify_toxic_speech("You are a fucking idiot and everyone here hates you, moron.")
    assert label == "toxic" and score > 0.9
    label, score = classify_toxic_speech((FIXTURES / "enc_corpus_en_head.txt").read_text()[:3000])
    assert label == "non-toxic" and score > 0.5
    assert classify_toxic_speech("") == ("non-toxic", 1.0)


def test_toxic_passage_in_long_clean_page_is_found():
    clean = (FIXTURES / "enc_wikitext2_valid_slice.txt").read_text(encoding="utf-8")[:8000]
    label, _ = classify_toxic_speech(clean + "\nshut up you stupid worthless idiot, go kill yourself\n" + clean)
    assert label == "toxic"


def test_nsfw_lexicon():
    label, score = classify_nsfw("hot naked girls porn xxx pussy videos free sex cams")
    assert label == "nsfw" and score == 1.0
    label, score = classify_nsfw((FIXTURES / "enc_wikitext2_valid_slice.txt").read_text(encoding="utf-8"))
    assert label == "non-nsfw" and score > 0.9
    assert classify_nsfw("") == ("non-nsfw", 1.0)
    assert harmful_probability("non-nsfw", 0.8, "nsfw") == pytest.approx(0.2)
    assert harmful_probability("nsfw", 0.8, "nsfw") == 0.8


def words(n: int, word: str = "word") -> str:
    return " ".join([word] * n)


def test_gopher_word_count_boundaries():
    assert gopher_quality_filter(words(50))
    assert gopher_reasons(words(49)) == ["too_few_words"]
    assert gopher_quality_filter(words(100_000))
    assert gopher_reasons(words(100_001)) == ["too_many_words"]


def test_gopher_mean_word_length_boundaries():
    assert gopher_quality_filter(words(60, "abc"))  # mean exactly 3
    assert gopher_reasons(words(60, "ab")) == ["mean_word_length_short"]
    assert gopher_quality_filter(words(60, "a" * 10))  # exactly 10
    assert gopher_reasons(words(60, "a" * 11)) == ["mean_word_length_long"]


def test_gopher_ellipsis_and_alpha_boundaries():
    line = "these are some plain words here"
    lines = [line + "..."] * 3 + [line] * 7  # exactly 30% of 10 lines end with "..."
    text = "\n".join(lines)
    assert len(text.split()) >= 50
    assert "ellipsis_lines" not in gopher_reasons(text)
    lines = [line + "…"] * 4 + [line] * 6
    assert "ellipsis_lines" in gopher_reasons("\n".join(lines))
    alpha = " ".join(["word"] * 80 + ["123"] * 20)  # exactly 80% alphabetic
    assert gopher_quality_filter(alpha)
    alpha = " ".join(["word"] * 79 + ["123"] * 21)
    assert gopher_reasons(alpha) == ["few_alphabetic_words"]


def test_gopher_further_rules_are_optional():
    text = "\n".join(["- item number one is here"] * 20)
    assert gopher_quality_filter(text)
    assert "bullet_lines" in gopher_reasons(text, max_bullet_lines_ratio=0.9)
    assert "few_stop_words" in gopher_reasons(text, min_stop_words=2)
    assert "symbol_word_ratio" in gopher_reasons(" ".join(["#tag word"] * 30), max_symbol_word_ratio=0.1)
    prose = (FIXTURES / "enc_wikitext2_valid_slice.txt").read_text(encoding="utf-8")[:5000]
    assert gopher_quality_filter(prose, max_symbol_word_ratio=0.1, max_bullet_lines_ratio=0.9, min_stop_words=2)


def test_quality_features_are_stable_and_normalised():
    idx, vals = features("The cat sat on the mat", 1024, 2)
    idx2, vals2 = features("The cat sat on the mat", 1024, 2)
    assert np.array_equal(idx, idx2) and np.allclose(vals, vals2)
    assert np.isclose((vals ** 2).sum(), 1.0) and len(idx) <= 11
    assert len(features("!!!", 1024, 2)[0]) == 0


def test_shuffle_blocks_keeps_neighbours_together():
    import random

    out = shuffle_blocks(list(range(95)), 10, random.Random(0))
    assert sorted(out) == list(range(95)) and out != list(range(95))
    runs = [out[i:i + 10] for i in range(0, 90, 10)]
    # every run is 10 consecutive items (or the short tail run), so a held-out prefix of k
    # runs shares no neighbours with the rest except at one boundary
    assert all(r == list(range(r[0], r[0] + len(r))) for r in runs if r[0] != 90)
    heldout = set(out[:20])
    neighbours = sum((x + 1 in heldout) != (x in heldout) for x in range(94))
    assert neighbours <= 4  # a chunk-level shuffle would give ~30 boundaries


def test_quality_classifier_separates_wikipedia_from_shakespeare(tmp_path):
    wiki = (FIXTURES / "enc_wikitext2_valid_slice.txt").read_text(encoding="utf-8")
    plays = (REPO / "lmrun/data/corpora/tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000]
    pos = list(training_chunks([wiki], chunk_words=60, min_words=30))
    neg = list(training_chunks([plays], chunk_words=60, min_words=30))
    model, stats = train_quality_classifier(pos, neg, num_buckets=1 << 16, epochs=5, seed=0)
    assert stats["heldout_accuracy"] >= 0.9 and stats["heldout_examples"] >= 6
    path = tmp_path / "q.npz"
    model.save(path)
    label, score = classify_quality(pos[0], model_path=str(path))
    assert label == "wiki" and 0.5 <= score <= 1.0
    assert classify_quality(neg[-1], model=QualityModel.load(path))[0] == "cc"
    (tmp_path / "bad.npz").write_bytes(b"not a model")
    with pytest.raises(FormatError):
        QualityModel.load(tmp_path / "bad.npz")
    with pytest.raises(DataError):
        train_quality_classifier(pos[:1], neg)
