"""Harmful-content classifiers: ``classify_nsfw`` and ``classify_toxic_speech`` -> (label, score).

``label`` is the predicted class (``"nsfw"``/``"non-nsfw"``, ``"toxic"``/``"non-toxic"``) and
``score`` its probability in [0, 1] (CS336 assignment 4's convention); :func:`harmful_probability`
turns that into P(harmful) for thresholding.

Backends:
- ``fasttext``: a fastText model file by path, e.g. Dolma's Jigsaw classifiers
  (``jigsaw_fasttext_bigrams_nsfw_final.bin``, ``..._hatespeech_final.bin``; labels
  ``__label__nsfw`` / ``__label__toxic`` and their ``non-`` twins).
- ``default`` (offline, shipped in PyPI wheels, nothing downloaded):
  toxicity = alt-profanity-check's linear SVM over TF-IDF features (calibrated probability;
  trained by its authors on ~200k human-labelled comments from Davidson et al. 2017 and the
  Wikipedia/Jigsaw toxic-comment data); NSFW = a lexicon rule: the share of words found in
  better-profanity's word list (~900 obscene and sexual terms), scaled so that 2.5% of words
  gives 0.5 and 5% or more gives 1.0. Both are weak proxies of the Jigsaw-trained models: they
  key on obscene vocabulary and miss toxicity or sexual content written in clean words. Use
  the fastText models where the cluster has them.
"""
from __future__ import annotations

import re
from functools import lru_cache

from lmrun.curation.langid import fasttext_predict

#: P(nsfw) = min(1, share of lexicon words * NSFW_SCALE)
NSFW_SCALE = 20.0
#: passage length (characters) scored by the default toxicity backend
CHUNK_CHARS = 500
_WORD_RE = re.compile(r"[a-z0-9@$!*]+(?:['-][a-z0-9]+)*")
_MAX_CHARS = 100_000


@lru_cache(maxsize=1)
def nsfw_lexicon() -> frozenset[str]:
    """Single-word entries of better-profanity's word list (lower case)."""
    from importlib import resources

    text = resources.files("better_profanity").joinpath("profanity_wordlist.txt").read_text(encoding="utf-8")
    return frozenset(w.strip().lower() for w in text.splitlines() if w.strip() and " " not in w.strip())


def _binary(label: str, positive: str, p_positive: float) -> tuple[str, float]:
    p = float(min(max(p_positive, 0.0), 1.0))
    return (positive, p) if p >= 0.5 else (f"non-{positive}", 1.0 - p)


def classify_nsfw(text: str, backend: str = "default", model_path: str | None = None) -> tuple[str, float]:
    """``("nsfw" | "non-nsfw", probability of that label)`` for ``text`` (see the module
    docstring for the backends). Raises DataError for a fastText file that cannot be loaded."""
    if backend == "fasttext":
        label, p = fasttext_predict(model_path, text[:_MAX_CHARS])
        return label, p
    words = _WORD_RE.findall(text[:_MAX_CHARS].lower())
    if not words:
        return "non-nsfw", 1.0
    lex = nsfw_lexicon()
    hits = sum(w in lex for w in words)
    return _binary("nsfw", "nsfw", min(1.0, hits / len(words) * NSFW_SCALE))


@lru_cache(maxsize=1)
def _profanity_model():
    from profanity_check import profanity_check as pc

    return pc.vectorizer, pc.model


def classify_toxic_speech(text: str, backend: str = "default", model_path: str | None = None) -> tuple[str, float]:
    """``("toxic" | "non-toxic", probability of that label)`` for ``text``. The default
    backend scores passages of about ``CHUNK_CHARS`` characters (consecutive lines joined, up
    to 100 passages) with alt-profanity-check and takes the highest probability, so one toxic
    passage in a long page is not averaged away."""
    if backend == "fasttext":
        return fasttext_predict(model_path, text[:_MAX_CHARS])
    chunks, buf = [], ""
    for ln in text[:_MAX_CHARS].splitlines():
        if ln.strip():
            buf = f"{buf}\n{ln}" if buf else ln
            if len(buf) >= CHUNK_CHARS:
                chunks.append(buf)
                buf = ""
    if buf:
        chunks.append(buf)
    if not chunks:
        return "non-toxic", 1.0
    vectorizer, model = _profanity_model()
    probs = model.predict_proba(vectorizer.transform(chunks[:100]))[:, 1]
    return _binary("toxic", "toxic", float(probs.max()))


def harmful_probability(label: str, score: float, positive: str) -> float:
    """P(``positive``) from a (label, score-of-label) pair: ``score`` if the label is the
    positive one, else ``1 - score`` (fastText labels ``__label__`` prefixes already removed)."""
    return score if label == positive else 1.0 - score
