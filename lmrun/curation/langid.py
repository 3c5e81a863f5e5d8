"""Language identification: ``identify_language(text) -> (ISO 639-1 code, probability)``.

Default backend: py3langid (a fork of langid.py, Lui & Baldwin 2012: naive Bayes over byte
n-grams, 97 languages; the model ships inside the wheel, so it works offline). Backend
"fasttext": a fastText LID model file by path (e.g. ``lid.176.bin``, Joulin et al. 2016), as
CCNet and Dolma use; labels ``__label__xx`` become ``xx``.
"""
from __future__ import annotations

from functools import lru_cache

from lmrun.errors import DataError


@lru_cache(maxsize=1)
def _py3langid():
    from py3langid import langid

    return langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)


@lru_cache(maxsize=8)
def load_fasttext_model(path: str):
    """A fastText model loaded once per process; DataError for a missing or bad file."""
    try:
        import fasttext
    except ImportError:
        raise DataError("fastText model files need the fasttext package: pip install fasttext-community") from None
    try:
        return fasttext.load_model(str(path))
    except ValueError as e:
        raise DataError(f"{path}: cannot load fastText model ({e})") from None


def fasttext_predict(path: str, text: str) -> tuple[str, float]:
    """Top label (without ``__label__``) and its probability from the fastText model at ``path``."""
    model = load_fasttext_model(path)
    labels, probs = model.predict(" ".join(text.split()), k=1)
    if not labels:
        return "unknown", 0.0
    return labels[0].removeprefix("__label__"), float(min(max(probs[0], 0.0), 1.0))


def identify_language(text: str, backend: str = "py3langid", model_path: str | None = None) -> tuple[str, float]:
    """The most likely language of ``text`` and its probability in [0, 1].

    Returns ``("unknown", 0.0)`` for text without letters. ``backend``: "py3langid" (offline,
    default) or "fasttext" (``model_path`` to a LID model file). Raises DataError for a model
    file that cannot be loaded."""
    if not any(ch.isalpha() for ch in text):
        return "unknown", 0.0
    if backend == "fasttext":
        if not model_path:
            raise DataError("identify_language: backend fasttext needs model_path")
        lang, p = fasttext_predict(model_path, text)
        return lang.split("_")[0] if lang.count("_") and len(lang) > 3 else lang, p
    lang, p = _py3langid().classify(text)
    return str(lang), float(min(max(p, 0.0), 1.0))
