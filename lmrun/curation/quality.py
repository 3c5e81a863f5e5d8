"""Quality classifier: hashed word n-gram logistic regression (fastText-style), ``wiki`` vs ``cc``.

Features: lower-cased words (runs of letters/digits), their 1..``ngrams``-grams hashed with
MurmurHash3 into ``num_buckets`` buckets (the hashing trick, Weinberger et al. 2009; bigram
hashing as in fastText, Joulin et al. 2016 "Bag of Tricks for Efficient Text
Classification"), L2-normalised counts; a logistic regression trained by SGD with a linearly
decaying learning rate. It is the linear core of fastText's supervised mode without the
low-rank embedding. Positives are high-quality references (label ``wiki``; OpenAI's GPT-3 and
CS336 assignment 4 use pages linked from Wikipedia), negatives crawl text (label ``cc``).
The model is one ``.npz`` file (weights, bias, hyper-parameters).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from lmrun.errors import DataError, FormatError

_WORD_RE = re.compile(r"[^\W_]+")
LABELS = ("cc", "wiki")


@dataclass
class QualityModel:
    """weights: (num_buckets,) float32; bias: float; ngrams: n-gram order used for features."""

    weights: np.ndarray
    bias: float
    ngrams: int

    @property
    def num_buckets(self) -> int:
        return int(self.weights.shape[0])

    def save(self, path: str | Path) -> None:
        from lmrun.tracking.files import atomic_write

        atomic_write(path, lambda f: np.savez(f, weights=self.weights, bias=np.float64(self.bias),
                                              ngrams=np.int64(self.ngrams), format=np.int64(1)))

    @classmethod
    def load(cls, path: str | Path) -> "QualityModel":
        """Raises DataError for a missing file, FormatError for a file that is not a model."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"curate.quality.model_path: file not found: {path}")
        try:
            with np.load(path) as z:
                return cls(z["weights"].astype(np.float32), float(z["bias"]), int(z["ngrams"]))
        except Exception as e:
            raise FormatError(f"{path}: not a quality model .npz ({type(e).__name__}: {e})") from None


def features(text: str, num_buckets: int, ngrams: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashed n-gram features of ``text``: (bucket indices (k,) int64, values (k,) float32),
    values L2-normalised counts. Empty arrays for text without words."""
    import mmh3

    words = _WORD_RE.findall(text.lower())
    grams = list(words)
    for n in range(2, ngrams + 1):
        grams += [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    idx = np.fromiter((mmh3.hash(g, 17, signed=False) % num_buckets for g in grams), np.int64, len(grams))
    uniq, counts = np.unique(idx, return_counts=True)
    vals = counts.astype(np.float32)
    vals /= np.sqrt((vals * vals).sum())
    return uniq, vals


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + np.exp(-z)) if z >= 0 else np.exp(z) / (1.0 + np.exp(z))


def shuffle_blocks(items: list, block: int, rng: random.Random) -> list:
    """``items`` cut into runs of ``block`` consecutive items, the runs shuffled and joined:
    neighbours (chunks of one document) stay together, so the first k items of the result
    overlap the rest in at most one run."""
    runs = [items[i:i + block] for i in range(0, len(items), block)]
    rng.shuffle(runs)
    return [x for run in runs for x in run]


def train_quality_classifier(positives: list[str], negatives: list[str], *, num_buckets: int = 1 << 20,
                             ngrams: int = 2, epochs: int = 5, lr: float = 0.5, heldout_fraction: float = 0.2,
                             seed: int = 0, balance: bool = True, heldout_block: int = 10) -> tuple[QualityModel, dict]:
    """Train on texts (``positives`` -> ``wiki``, ``negatives`` -> ``cc``), given in corpus
    order (chunks of one document next to each other). Each class is cut into runs of
    ``heldout_block`` consecutive examples and the runs shuffled (:func:`shuffle_blocks`), so
    the held-out examples (the first ``heldout_fraction`` of each class) are not neighbours of
    training examples from the same passage — a chunk-level shuffle would put adjacent chunks of
    one document on both sides and overstate the accuracy. The classes are balanced by
    down-sampling the larger one (``balance``; whole runs). Returns the model and
    ``{"train_examples", "heldout_examples", "heldout_accuracy", "heldout_accuracy_wiki",
    "heldout_accuracy_cc", "train_accuracy", "positives", "negatives"}``. Raises DataError
    when a class has fewer than 2 examples."""
    rng = random.Random(seed)
    pos, neg = list(positives), list(negatives)
    if len(pos) < 2 or len(neg) < 2:
        raise DataError(f"quality classifier: need at least 2 examples per class, got {len(pos)} wiki / {len(neg)} cc")
    block = max(1, int(heldout_block))
    pos, neg = shuffle_blocks(pos, block, rng), shuffle_blocks(neg, block, rng)
    if balance:
        m = min(len(pos), len(neg))
        pos, neg = pos[:m], neg[:m]
    splits = {}
    for label, docs in ((1, pos), (0, neg)):
        k = max(1, int(round(len(docs) * heldout_fraction)))
        splits[label] = (docs[k:], docs[:k])
    train = [(t, 1) for t in splits[1][0]] + [(t, 0) for t in splits[0][0]]
    held = [(t, 1) for t in splits[1][1]] + [(t, 0) for t in splits[0][1]]
    feats = [(features(t, num_buckets, ngrams), y) for t, y in train]
    w = np.zeros(num_buckets, np.float32)
    b = 0.0
    total, step = epochs * len(feats), 0
    order = list(range(len(feats)))
    for _ in range(epochs):
        rng.shuffle(order)
        for i in order:
            (idx, vals), y = feats[i]
            eta = lr * (1.0 - step / total)
            step += 1
            p = _sigmoid(float(w[idx] @ vals) + b)
            g = p - y
            w[idx] -= np.float32(eta * g) * vals
            b -= eta * g
    model = QualityModel(w, b, ngrams)

    def accuracy(items):
        if not items:
            return None
        return sum((score_quality(model, t) >= 0.5) == bool(y) for t, y in items) / len(items)

    stats = {"train_examples": len(train), "heldout_examples": len(held), "positives": len(pos),
             "negatives": len(neg), "train_accuracy": accuracy(train), "heldout_accuracy": accuracy(held),
             "heldout_accuracy_wiki": accuracy([h for h in held if h[1] == 1]),
             "heldout_accuracy_cc": accuracy([h for h in held if h[1] == 0])}
    return model, stats


def score_quality(model: QualityModel, text: str) -> float:
    """P(wiki) in [0, 1] under ``model``."""
    idx, vals = features(text, model.num_buckets, model.ngrams)
    return float(_sigmoid(float(model.weights[idx] @ vals) + model.bias)) if len(idx) else float(_sigmoid(model.bias))


@lru_cache(maxsize=4)
def load_quality_model(path: str):
    """The model at ``path``: our ``.npz`` or a fastText ``.bin`` (labels wiki/cc), once per process."""
    if str(path).endswith(".bin"):
        from lmrun.curation.langid import load_fasttext_model

        return load_fasttext_model(path)
    return QualityModel.load(path)


def classify_quality(text: str, model_path: str | None = None, model: QualityModel | None = None) -> tuple[str, float]:
    """``("wiki" | "cc", probability of that label)`` for ``text``, with ``model`` or the model
    file at ``model_path`` (ours or fastText). Raises DataError/FormatError for a bad file."""
    if model is None:
        if not model_path:
            raise DataError("classify_quality: give model_path (curate.quality.model_path) or model")
        model = load_quality_model(str(model_path))
    if not isinstance(model, QualityModel):  # fastText
        from lmrun.curation.langid import fasttext_predict

        return fasttext_predict(str(model_path), text)
    p = score_quality(model, text)
    return ("wiki", p) if p >= 0.5 else ("cc", 1.0 - p)


def training_chunks(texts, chunk_words: int = 200, min_words: int = 50, max_chars: int = 20_000):
    """Cut documents into training examples: paragraphs (blank-line separated) joined until
    ``chunk_words`` words; chunks under ``min_words`` are dropped. Yields strings."""
    for text in texts:
        buf: list[str] = []
        n = 0
        for para in re.split(r"\n\s*\n", text):
            if not para.strip():
                continue
            buf.append(para.strip())
            n += len(para.split())
            if n >= chunk_words:
                yield "\n\n".join(buf)[:max_chars]
                buf, n = [], 0
        if n >= min_words:
            yield "\n\n".join(buf)[:max_chars]
