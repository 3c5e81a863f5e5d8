"""The Gopher quality rules (Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
Insights from Training Gopher", appendix A.1.1 "MassiveWeb" quality filters).

Words are whitespace-separated tokens (as in the paper's rules and CS336 assignment 4).
Rules (``None`` switches one off; the first four are CS336's and on by default):
  - ``min_words`` .. ``max_words`` words (50 .. 100,000);
  - mean word length (characters) in ``[min_mean_word_length, max_mean_word_length]`` (3 .. 10);
  - at most ``max_ellipsis_lines_ratio`` of lines end with "..." or "…" (0.3);
  - at least ``min_alpha_words_ratio`` of words contain an alphabetic character (0.8);
  - further rules of the paper: symbol-to-word ratio ("#" and "..."/"…" per word, paper 0.1),
    share of lines starting with a bullet (paper 0.9), at least ``min_stop_words`` of
    "the, be, to, of, and, that, have, with" (paper 2).
"""
from __future__ import annotations

STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "-", "*", "‣", "⁃", "◦")


def gopher_reasons(text: str, min_words: int | None = 50, max_words: int | None = 100_000,
                   min_mean_word_length: float | None = 3.0, max_mean_word_length: float | None = 10.0,
                   max_ellipsis_lines_ratio: float | None = 0.3, min_alpha_words_ratio: float | None = 0.8,
                   max_symbol_word_ratio: float | None = None, max_bullet_lines_ratio: float | None = None,
                   min_stop_words: int | None = None) -> list[str]:
    """Names of the rules ``text`` fails (empty list: it passes). Boundaries are inclusive:
    exactly 50 words, a mean length of exactly 3 or 10, exactly 30% ellipsis lines and exactly
    80% alphabetic words pass."""
    words = text.split()
    n = len(words)
    reasons: list[str] = []
    if min_words is not None and n < min_words:
        reasons.append("too_few_words")
    if max_words is not None and n > max_words:
        reasons.append("too_many_words")
    if n:
        mean_len = sum(len(w) for w in words) / n
        if min_mean_word_length is not None and mean_len < min_mean_word_length:
            reasons.append("mean_word_length_short")
        if max_mean_word_length is not None and mean_len > max_mean_word_length:
            reasons.append("mean_word_length_long")
        if min_alpha_words_ratio is not None:
            alpha = sum(any(ch.isalpha() for ch in w) for w in words)
            if alpha / n < min_alpha_words_ratio:
                reasons.append("few_alphabetic_words")
        if max_symbol_word_ratio is not None:
            symbols = text.count("#") + text.count("...") + text.count("…")
            if symbols / n > max_symbol_word_ratio:
                reasons.append("symbol_word_ratio")
        if min_stop_words is not None:
            stops = sum(w.lower().strip(".,;:!?\"'()") in STOP_WORDS for w in words)
            if stops < min_stop_words:
                reasons.append("few_stop_words")
    elif min_stop_words:
        reasons.append("few_stop_words")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines:
        if max_ellipsis_lines_ratio is not None:
            ell = sum(ln.rstrip().endswith(("...", "…")) for ln in lines)
            if ell / len(lines) > max_ellipsis_lines_ratio:
                reasons.append("ellipsis_lines")
        if max_bullet_lines_ratio is not None:
            bullets = sum(ln.lstrip().startswith(BULLETS) for ln in lines)
            if bullets / len(lines) > max_bullet_lines_ratio:
                reasons.append("bullet_lines")
    return reasons


def gopher_quality_filter(text: str, **rules) -> bool:
    """True if ``text`` passes every enabled Gopher rule (keyword arguments as in
    :func:`gopher_reasons`; defaults: the four CS336 rules)."""
    return not gopher_reasons(text, **rules)
