"""Config schema of the ``curate`` node (presets in conf/curate/; stage ``curate``).

Each pipeline step owns a small dataclass here; :class:`CurateConfig` holds them plus the
inputs, the sharding and the list of steps that run. Validation raises one-line ConfigErrors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmrun.errors import ConfigError, check, check_choice

#: The per-document steps (phase 1, per shard) and the corpus-wide steps (phase 2), in the
#: only order they can run: extraction first, dedup last.
DOC_STEPS = ["extract", "langid", "pii", "harmful", "gopher", "quality"]
DEDUP_STEPS = ["exact_dedup", "minhash_dedup"]
ALL_STEPS = DOC_STEPS + DEDUP_STEPS
FORMATS = ["auto", "warc", "wet", "text", "jsonl", "html"]


@dataclass
class LangIdConfig:
    """backend: "py3langid" (offline model inside the py3langid wheel; 97 languages) or
    "fasttext" (a fastText LID model file, e.g. lid.176.bin, at ``model_path``);
    languages: ISO 639-1 codes kept (empty: keep every language, only annotate);
    min_score: minimum probability of the predicted language, in [0, 1]."""

    backend: str = "py3langid"
    model_path: str | None = None
    languages: list[str] = field(default_factory=lambda: ["en"])
    min_score: float = 0.5


@dataclass
class PiiConfig:
    """Which PII kinds are masked (with ``|||EMAIL_ADDRESS|||``, ``|||PHONE_NUMBER|||``,
    ``|||IP_ADDRESS|||``). Masking never removes a document."""

    emails: bool = True
    phone_numbers: bool = True
    ips: bool = True


@dataclass
class HarmfulConfig:
    """backend: "default" (offline: toxicity from alt-profanity-check's linear SVM, NSFW from a
    lexicon, both shipped in PyPI wheels; see lmrun/curation/harmful.py) or "fasttext" (model
    files by path, e.g. Dolma's Jigsaw classifiers). A document is removed when the harmful
    label's score is >= its threshold."""

    backend: str = "default"
    nsfw_model_path: str | None = None
    toxic_model_path: str | None = None
    nsfw_threshold: float = 0.5
    toxic_threshold: float = 0.5
    nsfw: bool = True
    toxic: bool = True


@dataclass
class GopherConfig:
    """The Gopher quality rules (Rae et al. 2021, appendix A). The four rules of CS336 are on
    by default; ``null`` switches a rule off. Ratios are in [0, 1]."""

    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    # further Gopher rules, off by default
    max_symbol_word_ratio: float | None = None  # "#" and "..." per word (Gopher: 0.1)
    max_bullet_lines_ratio: float | None = None  # lines starting with a bullet (Gopher: 0.9)
    min_stop_words: int | None = None  # of "the, be, to, of, and, that, have, with" (Gopher: 2)


@dataclass
class QualityConfig:
    """Quality classifier (hashed word n-gram logistic regression, fastText-style).

    train: train it in this run from ``positives`` (label ``wiki``) and ``negatives`` (label
    ``cc``) — text files (documents separated by ``<|endoftext|>``, else blank lines), JSONL or
    WARC — and report held-out accuracy; model_path: a trained model (``quality_model.npz`` of
    an earlier run) or a fastText model file (``.bin``, labels __label__wiki/__label__cc);
    threshold: documents with P(wiki) below it are removed."""

    train: bool = False
    model_path: str | None = None
    positives: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    threshold: float = 0.5
    num_buckets: int = 1 << 20
    ngrams: int = 2
    epochs: int = 5
    lr: float = 0.5
    heldout_fraction: float = 0.2
    max_doc_chars: int = 20_000


@dataclass
class DedupConfig:
    """MinHash LSH (Broder 1997; Leskovec et al., MMDS ch. 3): ``num_hashes`` = ``num_bands`` x
    rows per band; candidates confirmed by their true Jaccard >= ``jaccard_threshold`` over word
    ``ngrams``-grams of the normalised text."""

    num_hashes: int = 120
    num_bands: int = 20
    ngrams: int = 5
    jaccard_threshold: float = 0.8
    seed: int = 0


@dataclass
class CurateConfig:
    """The curation pipeline (stage ``curate``).

    inputs: files, folders or glob patterns; format: how to read them ("auto" by suffix:
        .warc(.gz) -> warc, .wet(.gz) -> wet, .jsonl(.gz) -> jsonl, .html/.htm -> html, else text);
    steps: the steps that run, a subset of ``extract, langid, pii, harmful, gopher, quality,
        exact_dedup, minhash_dedup`` (always run in that order);
    num_shards: input files are split into this many shards (by file, round-robin by size);
    shard_index: null runs every shard (``num_workers`` processes) and then the dedup phase;
        an integer runs only that shard's document steps (one element of a Slurm array);
    phase: "all", "filter" (document steps only) or "dedup" (dedup over the finished shards
        in ``output_dir``);
    output_dir: where shards and clean output go (null: the run directory); with
        ``shard_index`` or ``phase=dedup`` it must be shared by the jobs;
    num_workers: processes for the shards (null: min(CPU cores, shards));
    samples_per_step: documents kept/removed per step written to samples/ for inspection;
    min_doc_chars: documents shorter than this after a step that changes text are dropped;
    extract_main_content: drop navigation, headers and footers while extracting HTML
        (resiliparse's main-content heuristics);
    strict: an input file cut off or corrupt (a truncated ``.warc.gz``) fails the run
        (DataError naming the file and byte) instead of a warning and an entry in the report's
        ``read_errors`` (the documents before the damage are kept).
    """

    name: str = "web"
    inputs: list[str] = field(default_factory=list)
    format: str = "auto"
    steps: list[str] = field(default_factory=lambda: list(ALL_STEPS))
    num_shards: int = 1
    shard_index: int | None = None
    phase: str = "all"
    output_dir: str | None = None
    num_workers: int | None = None
    samples_per_step: int = 3
    min_doc_chars: int = 1
    extract_main_content: bool = True
    strict: bool = False
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    harmful: HarmfulConfig = field(default_factory=HarmfulConfig)
    gopher: GopherConfig = field(default_factory=GopherConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)


def _ratio(key: str, value) -> None:
    if value is not None:
        check(key, value, 0.0 <= value <= 1.0, "null or a number in [0, 1]")


def validate_curate(cfg: CurateConfig, stage: str) -> None:
    """Raise ConfigError for an impossible curate config (no file reads). Inputs are only
    required when ``stage`` is ``curate``."""
    check_choice("curate.format", cfg.format, FORMATS)
    check_choice("curate.phase", cfg.phase, ["all", "filter", "dedup"])
    steps = list(cfg.steps)
    for s in steps:
        check_choice("curate.steps", s, ALL_STEPS)
    check("curate.steps", steps, len(set(steps)) == len(steps), "distinct step names")
    check("curate.num_shards", cfg.num_shards, cfg.num_shards >= 1, "an integer >= 1")
    if cfg.shard_index is not None:
        check("curate.shard_index", cfg.shard_index, 0 <= cfg.shard_index < cfg.num_shards,
              f"null or an integer in [0, {cfg.num_shards - 1}] (curate.num_shards={cfg.num_shards})")
        check("curate.output_dir", cfg.output_dir, bool(cfg.output_dir),
              "a directory shared by the shard jobs (required with curate.shard_index)")
        check("curate.phase", cfg.phase, cfg.phase != "dedup", "all or filter with curate.shard_index "
              "(the dedup phase runs over every shard: leave curate.shard_index=null)")
    if cfg.phase == "dedup":
        check("curate.output_dir", cfg.output_dir, bool(cfg.output_dir),
              "the directory holding the finished shards (required with curate.phase=dedup)")
    if cfg.num_workers is not None:
        check("curate.num_workers", cfg.num_workers, cfg.num_workers >= 1, "null or an integer >= 1")
    check("curate.samples_per_step", cfg.samples_per_step, cfg.samples_per_step >= 0, "an integer >= 0")
    check("curate.min_doc_chars", cfg.min_doc_chars, cfg.min_doc_chars >= 1, "an integer >= 1")
    lc = cfg.langid
    check_choice("curate.langid.backend", lc.backend, ["py3langid", "fasttext"])
    if lc.backend == "fasttext":
        check("curate.langid.model_path", lc.model_path, bool(lc.model_path),
              "a fastText LID model file with curate.langid.backend=fasttext")
    _ratio("curate.langid.min_score", lc.min_score)
    hc = cfg.harmful
    check_choice("curate.harmful.backend", hc.backend, ["default", "fasttext"])
    if hc.backend == "fasttext":
        if hc.nsfw:
            check("curate.harmful.nsfw_model_path", hc.nsfw_model_path, bool(hc.nsfw_model_path),
                  "a fastText model file with curate.harmful.backend=fasttext")
        if hc.toxic:
            check("curate.harmful.toxic_model_path", hc.toxic_model_path, bool(hc.toxic_model_path),
                  "a fastText model file with curate.harmful.backend=fasttext")
    _ratio("curate.harmful.nsfw_threshold", hc.nsfw_threshold)
    _ratio("curate.harmful.toxic_threshold", hc.toxic_threshold)
    g = cfg.gopher
    for key in ("min_words", "max_words", "min_stop_words"):
        v = getattr(g, key)
        if v is not None:
            check(f"curate.gopher.{key}", v, v >= 0, "null or an integer >= 0")
    if g.min_words is not None and g.max_words is not None:
        check("curate.gopher.max_words", g.max_words, g.max_words >= g.min_words,
              f"an integer >= curate.gopher.min_words ({g.min_words})")
    for key in ("min_mean_word_length", "max_mean_word_length"):
        v = getattr(g, key)
        if v is not None:
            check(f"curate.gopher.{key}", v, v >= 0, "null or a number >= 0")
    for key in ("max_ellipsis_lines_ratio", "min_alpha_words_ratio", "max_symbol_word_ratio",
                "max_bullet_lines_ratio"):
        _ratio(f"curate.gopher.{key}", getattr(g, key))
    q = cfg.quality
    _ratio("curate.quality.threshold", q.threshold)
    check("curate.quality.heldout_fraction", q.heldout_fraction, 0.0 < q.heldout_fraction < 1.0, "a number in (0, 1)")
    check("curate.quality.num_buckets", q.num_buckets, q.num_buckets >= 16, "an integer >= 16")
    check("curate.quality.ngrams", q.ngrams, q.ngrams >= 1, "an integer >= 1")
    check("curate.quality.epochs", q.epochs, q.epochs >= 1, "an integer >= 1")
    check("curate.quality.lr", q.lr, q.lr > 0, "a number > 0")
    if q.train:
        check("curate.quality.positives", list(q.positives), bool(q.positives),
              "a non-empty list of files with curate.quality.train=true")
        check("curate.quality.negatives", list(q.negatives), bool(q.negatives),
              "a non-empty list of files with curate.quality.train=true")
    if stage == "curate" and "quality" in steps and not (q.train or q.model_path):
        raise ConfigError("curate.steps: the quality step needs curate.quality.model_path=FILE or "
                          "curate.quality.train=true (or remove quality from curate.steps)")
    d = cfg.dedup
    check("curate.dedup.num_hashes", d.num_hashes, d.num_hashes >= 1, "an integer >= 1")
    check("curate.dedup.num_bands", d.num_bands, 1 <= d.num_bands <= d.num_hashes and d.num_hashes % d.num_bands == 0,
          f"an integer >= 1 dividing curate.dedup.num_hashes ({d.num_hashes})")
    check("curate.dedup.ngrams", d.ngrams, d.ngrams >= 1, "an integer >= 1")
    _ratio("curate.dedup.jaccard_threshold", d.jaccard_threshold)
    if stage == "curate" and cfg.phase != "dedup":
        check("curate.inputs", list(cfg.inputs), bool(cfg.inputs),
              "a list of files, folders or globs (e.g. curate.inputs=[crawl.warc.gz])")
