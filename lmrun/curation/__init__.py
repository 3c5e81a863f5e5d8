"""Data curation (CS336 assignment 4): readers, HTML extraction, language id, PII masking,
harmful-content and Gopher quality filters, a quality classifier, exact-line and MinHash
dedup, and the sharded pipeline behind ``stage=curate``. Heavy libraries load on first use."""
from lmrun import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "config": ["CurateConfig", "validate_curate"],
    "readers": ["read_documents", "list_input_files", "shard_files", "read_warc"],
    "extract": ["extract_text_from_html_bytes", "decode_html_bytes"],
    "langid": ["identify_language"],
    "pii": ["mask_emails", "mask_phone_numbers", "mask_ips", "mask_pii"],
    "harmful": ["classify_nsfw", "classify_toxic_speech"],
    "gopher": ["gopher_quality_filter", "gopher_reasons"],
    "quality": ["classify_quality", "train_quality_classifier", "QualityModel"],
    "dedup": ["exact_line_deduplication", "minhash_deduplication", "find_near_duplicates", "normalize_text"],
})
