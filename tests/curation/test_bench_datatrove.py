"""The datatrove comparison's own pieces: exact similar pairs by prefix filtering, the planted
corpus, and (when datatrove and spaCy are installed) our Gopher rules against datatrove's."""
from __future__ import annotations

import itertools

import pytest

from tests.conftest import EXAMPLE_PAGES, FIXTURES, REPO

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

    pages = [extract_text_from_html_bytes((EXAMPLE_PAGES / name).read_bytes(), main_content=True)
             for name in ("moby.html", "getpass.html")]
    words = " ".join(_texts()).split()
    passages = [" ".join(words[i:i + n]) for i, n in zip(range(0, 40_000, 2_000), itertools.cycle([30, 80, 400]))]
    docs = pages + passages + ["#" * 3 + " tag " * 60, "... \n" * 40 + "word " * 60, "- item one\n" * 70]
    dt = GopherQualityFilter(language=_WhitespaceWords())
    ours = [not gopher_reasons(t, **GOPHER_PAPER) for t in docs]
    theirs = [dt.filter(Document(text=t, id=str(i))) is True for i, t in enumerate(docs)]
    assert ours == theirs
    assert 0 < sum(ours) < len(docs)


def test_ablation_table_and_figure_from_a_sweep(tmp_path):
    """lmrun.curation.ablation reads each job's arm (data.train's folder), summary and curve."""
    import json

    from lmrun.curation.ablation import main

    sweep = tmp_path / "sweep"
    for job, (arm, loss) in enumerate([("curated", 5.5), ("raw", 5.7)]):
        d = sweep / str(job)
        d.mkdir(parents=True)
        text = tmp_path / arm / "clean.txt"
        text.parent.mkdir()
        text.write_text("x" * 2_000_000)
        (d / "run.json").write_text(json.dumps({"seed": 0, "overrides": [f"data.train={text}", "experiment=curation_ablation"]}))
        (d / "summary.json").write_text(json.dumps({"steps": 10, "tokens": 40960, "val_loss": loss, "val_bpb": loss / 2.4,
                                                    "final_train_loss": loss - 0.1, "train_seconds": 12.0}))
        lines = [{"step": s, "loss": 7.0 - s / 10, "tokens": s * 4096} for s in (5, 10)]
        lines += [{"step": 5, "val_loss": loss + 0.5, "val_bpb": 1.0}, {"step": 10, "val_loss": loss, "val_bpb": 1.0}]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ev = tmp_path / "eval_curated"
    ev.mkdir()
    (ev / "eval.json").write_text(json.dumps({"val_loss": 6.1, "val_bpb": 2.5}))
    out = tmp_path / "fig.png"
    assert main([str(sweep), "--out", str(out), "--md", str(tmp_path / "t.md"), "--eval",
                 f"0={ev}:wikitext"]) == 0
    assert out.stat().st_size > 10_000
    rows = (tmp_path / "t.md").read_text().splitlines()
    assert rows[2].startswith("| curated | 0 | 2.00 | 40,960 | 5.5000 | 2.2917 |") and rows[2].endswith("| 6.1000 / 2.5000 |")
    assert rows[3].startswith("| raw | 0 |") and rows[3].endswith("| - |")
    assert rows[7] == "| curated | 1 | 5.5000 (5.5000-5.5000) | 2.2917 | 6.1000 |"
    assert main([str(tmp_path / "eval_curated"), "--out", str(out)]) == 2  # no jobs: one-line error
