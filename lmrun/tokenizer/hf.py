"""Hugging Face tokenizer folders: write lmrun's byte-level BPE as one, and read one back.

:func:`save_hf_tokenizer` writes ``tokenizer.json`` (built with the ``tokenizers`` library),
``tokenizer_config.json`` (written by ``transformers``) and ``special_tokens_map.json`` into a
folder that ``transformers.AutoTokenizer.from_pretrained(folder)`` loads offline and that
encodes text to exactly the ids :class:`lmrun.tokenizer.tokenizer.Tokenizer` gives: same BPE
model (vocab and merges in GPT-2's printable byte-level form, :mod:`lmrun.tokenizer.formats`),
same pre-tokenizer (lmrun's GPT-2 regex, :data:`lmrun.tokenizer.pretokenize.GPT2_PATTERN`,
then the byte-to-unicode mapping), the special tokens as added tokens (matched whole, longest
first, before pre-tokenization), no normalizer and no BOS/EOS added by encoding.

:func:`load_hf_tokenizer` reads a byte-level BPE ``tokenizer.json`` (GPT-2, Qwen2, Llama-3 and
the folders written here) back into lmrun's vocab (id -> bytes), merges and special tokens.

Source: Hugging Face ``tokenizers`` (models.BPE, pre_tokenizers.Split/ByteLevel,
decoders.ByteLevel) and ``transformers`` (``PreTrainedTokenizerFast.save_pretrained``);
GPT-2's ``encoder.py`` for the byte-level form.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lmrun.errors import FormatError
from lmrun.tokenizer.formats import bytes_to_unicode, str_to_token, token_to_str
from lmrun.tokenizer.pretokenize import GPT2_PATTERN

__all__ = ["HFTokenizerData", "build_hf_tokenizer", "load_hf_tokenizer", "save_hf_tokenizer"]

#: the files :func:`save_hf_tokenizer` writes
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _special_ids(vocab: dict[int, bytes], special_tokens: list[str]) -> dict[str, int]:
    """Ids of the special tokens exactly as :class:`lmrun.tokenizer.tokenizer.Tokenizer` assigns
    them: the id of a token with the same bytes (lowest such id), else max id + 1, + 2, ..."""
    by_bytes: dict[bytes, int] = {}
    for i in sorted(vocab, reverse=True):
        by_bytes[vocab[i]] = i
    ids: dict[str, int] = {}
    next_id = max(vocab, default=-1) + 1
    for s in special_tokens:
        if not isinstance(s, str) or not s:
            raise FormatError(f"special token {s!r} is not allowed: special tokens must be non-empty strings")
        if s in ids:
            continue
        i = by_bytes.get(s.encode("utf-8"))
        if i is None:
            i = next_id
            next_id += 1
        ids[s] = i
    return ids


def build_hf_tokenizer(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]],
                       special_tokens: list[str] | None = None):
    """A ``tokenizers.Tokenizer`` that encodes and decodes like lmrun's ``Tokenizer(vocab,
    merges, special_tokens)`` and returns the same ids.

    Args:
        vocab: token id -> token bytes (ids need not be contiguous).
        merges: (left bytes, right bytes) in rank order.
        special_tokens: strings matched whole before pre-tokenization, with lmrun's ids (the id
            of a vocab token with the same bytes, else appended after the largest id).

    Raises FormatError if two ids hold the same bytes, a merge uses bytes not in the vocab, or
    a special token's text collides with the byte-level string of another token.
    Source: Hugging Face ``tokenizers`` (BPE model, Split + ByteLevel pre-tokenizer)."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    special_tokens = list(special_tokens or [])
    strings: dict[str, int] = {}
    for i in sorted(vocab):
        s = token_to_str(vocab[i])
        if s in strings:
            raise FormatError(f"cannot export to HF: ids {strings[s]} and {i} both hold token {vocab[i]!r}")
        strings[s] = i
    hf_merges = []
    for rank, (a, b) in enumerate(merges):
        sa, sb = token_to_str(a), token_to_str(b)
        for part in (sa, sb, sa + sb):
            if part not in strings:
                raise FormatError(f"cannot export to HF: merge {rank} ({a!r}, {b!r}) uses {str_to_token(part)!r}, "
                                  "which is not in the vocab")
        hf_merges.append((sa, sb))
    specials = _special_ids(vocab, special_tokens)
    regular = {a + b for a, b in merges} | {b for b in vocab.values() if len(b) == 1}
    for s, i in specials.items():
        if i in vocab and token_to_str(vocab[i]) != s:
            if vocab[i] in regular:
                # HF's model vocab holds one string per id: BPE needs the byte-level form there
                raise FormatError(f"cannot export to HF: special token {s!r} is also regular token {i}, whose "
                                  f"byte-level form {token_to_str(vocab[i])!r} differs from its text")
            del strings[token_to_str(vocab[i])]  # only the special token's own entry: keep its text
        # HF finds an added token's id by looking its text up in the model's vocab
        if strings.setdefault(s, i) != i:
            raise FormatError(f"cannot export to HF: special token {s!r} collides with the byte-level "
                              f"string of token {strings[s]}")
    hf = HFTokenizer(models.BPE(vocab=strings, merges=hf_merges, fuse_unk=False, byte_fallback=False))
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(s, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                      special=True) for s in specials])
    for s, i in specials.items():
        if hf.token_to_id(s) != i:  # pragma: no cover - guarded by the vocab entry above
            raise FormatError(f"cannot export to HF: special token {s!r} got id {hf.token_to_id(s)}, expected {i}")
    return hf


def _role_tokens(special_tokens: list[str]) -> dict[str, str]:
    """EOS/BOS/pad from lmrun's special tokens: an end-of-text token (``<|endoftext|>``,
    ``</s>``, ``<|im_end|>``, ``<|eot_id|>``…) if there is one, else the first special token;
    BOS and pad are the same token (GPT-2's convention; lmrun adds no BOS when encoding)."""
    if not special_tokens:
        return {}
    preferred = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|eot_id|>", "<|im_end|>", "<eos>")
    eos = next((s for s in preferred if s in special_tokens), special_tokens[0])
    return {"bos_token": eos, "eos_token": eos, "pad_token": eos}


def save_hf_tokenizer(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], special_tokens: list[str],
                      out_dir: str | os.PathLike, *, model_max_length: int | None = None) -> None:
    """Write a Hugging Face tokenizer folder for lmrun's byte-level BPE into ``out_dir``.

    Writes ``tokenizer.json`` (``tokenizers``' own serializer, see :func:`build_hf_tokenizer`),
    ``tokenizer_config.json`` (``transformers``' ``save_pretrained``; class
    ``PreTrainedTokenizerFast``, EOS/BOS/pad = the end-of-text special token, e.g.
    ``<|endoftext|>``) and ``special_tokens_map.json`` (the same roles, for older readers).
    Files are written to a temporary folder next to ``out_dir`` and moved in one by one, so a
    failure leaves no half-written file; other files in ``out_dir`` (e.g. a model) are kept.

    ``transformers.AutoTokenizer.from_pretrained(out_dir)`` then encodes any text to the ids of
    ``lmrun.tokenizer.tokenizer.Tokenizer(vocab, merges, special_tokens).encode(text)`` (special
    tokens inside text included) and decodes them back.

    Args:
        vocab: token id -> bytes; merges: rank order; special_tokens: e.g. ``["<|endoftext|>"]``.
        out_dir: folder, created if missing.
        model_max_length: the model's context length (tokens), recorded in tokenizer_config.json.

    Raises FormatError as :func:`build_hf_tokenizer`. Needs ``tokenizers`` and ``transformers``.
    Source: Hugging Face ``transformers`` tokenizer folder format."""
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(dict.fromkeys(special_tokens or []))
    hf = build_hf_tokenizer(vocab, merges, special_tokens)
    roles = _role_tokens(special_tokens)
    kwargs = dict(roles)
    if model_max_length is not None:
        kwargs["model_max_length"] = int(model_max_length)
    fast = PreTrainedTokenizerFast(tokenizer_object=hf, clean_up_tokenization_spaces=False, **kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-tokenizer-", dir=out))
    try:
        fast.save_pretrained(tmp)
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        # the class every transformers version has (4.x: the fast tokenizer; 5.x: an alias of
        # TokenizersBackend); the model's own class could rebuild the pipeline differently
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        # transformers 5 no longer writes this legacy file; 4.x and other tools read it
        (tmp / "special_tokens_map.json").write_text(
            json.dumps(roles, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        for name in HF_TOKENIZER_FILES:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class HFTokenizerData:
    """A byte-level BPE tokenizer read from a Hugging Face ``tokenizer.json``.

    Attributes:
        vocab: id -> token bytes, added tokens included (their text as UTF-8).
        merges: (left bytes, right bytes) in rank order.
        special_tokens: the added tokens' texts in id order (HF matches all added tokens whole,
            special or not, so lmrun treats them all as special tokens).
        pattern: the pre-tokenizer's split regex (GPT-2's for a plain ByteLevel pre-tokenizer).
        notes: ways in which lmrun's :class:`~lmrun.tokenizer.tokenizer.Tokenizer` (GPT-2 regex,
            no normalizer) would encode differently from the file, e.g. Llama-3's or Qwen2's
            regex, an NFC normalizer; empty when the ids are the same.
    """

    vocab: dict[int, bytes]
    merges: list[tuple[bytes, bytes]]
    special_tokens: list[str]
    pattern: str
    notes: list[str] = field(default_factory=list)

    @property
    def gpt2_compatible(self) -> bool:
        """True when lmrun's Tokenizer gives the same ids as the file's tokenizer."""
        return not self.notes


def _pre_tokenizer_pattern(pre: dict | None, notes: list[str]) -> str:
    """The split regex of a byte-level pre-tokenizer (JSON form); notes what lmrun cannot copy."""
    if pre is None:
        notes.append("no pre-tokenizer (lmrun always splits with GPT-2's regex)")
        return GPT2_PATTERN
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    pattern = None
    byte_level = False
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            pat = step.get("pattern", {})
            regex = pat.get("Regex") if isinstance(pat, dict) else None
            if regex is None:
                notes.append(f"a Split pre-tokenizer on a literal string {pat!r}")
                continue
            if pattern is not None:
                notes.append("more than one Split pre-tokenizer")
            pattern = regex
            if step.get("behavior", "Isolated") != "Isolated" or step.get("invert", False):
                notes.append(f"a Split pre-tokenizer with behavior {step.get('behavior')!r}, invert {step.get('invert')!r}")
        elif kind == "ByteLevel":
            byte_level = True
            if step.get("add_prefix_space", False):
                notes.append("ByteLevel add_prefix_space=true (lmrun adds no space before the text)")
            if step.get("use_regex", True):
                if pattern is not None:
                    notes.append("a Split pre-tokenizer followed by ByteLevel's own GPT-2 regex")
                pattern = GPT2_PATTERN
        else:
            notes.append(f"a {kind} pre-tokenizer")
    if not byte_level:
        raise FormatError("not a byte-level BPE tokenizer: its pre-tokenizer has no ByteLevel step")
    if pattern is None:
        notes.append("no split regex (lmrun always splits with GPT-2's regex)")
        return GPT2_PATTERN
    if pattern != GPT2_PATTERN and pattern != _HF_GPT2_PATTERN:
        notes.append(f"pre-tokenizer regex {pattern!r} is not GPT-2's")
    return pattern


#: GPT-2's regex as ``tokenizers``' ByteLevel and GPT-2's encoder.py spell it (same matches)
_HF_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_hf_tokenizer(path: str | os.PathLike) -> HFTokenizerData:
    """Read a byte-level BPE Hugging Face ``tokenizer.json`` (or a folder holding one) into
    lmrun's vocab (id -> bytes), merges and special tokens.

    The file is parsed by ``tokenizers`` (so whatever it accepts is read, merges in either of
    its two spellings) and re-serialized to read the model out. Tokens are decoded from GPT-2's
    byte-to-unicode form (:func:`lmrun.tokenizer.formats.str_to_token`); added tokens are
    stored as their UTF-8 text at their ids. ``Tokenizer(d.vocab, d.merges, d.special_tokens)``
    then gives the file's ids on any text when ``d.notes`` is empty (GPT-2, files written by
    :func:`save_hf_tokenizer`); Llama-3 and Qwen2 split text with other regexes (see ``notes``).

    Raises FormatError (one line, naming the file) if the file is missing, not a tokenizer,
    not a BPE model, or not byte-level (e.g. SentencePiece-style BPE with byte fallback).
    Source: Hugging Face ``tokenizers`` serialization format."""
    from tokenizers import Tokenizer as HFTokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FormatError(f"HF tokenizer file not found: {p}")
    try:
        hf = HFTokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{p}: not a valid tokenizer.json ({msg})") from None
    doc = json.loads(hf.to_str())
    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        raise FormatError(f"{p}: model type {model.get('type')!r} is not BPE")
    if model.get("byte_fallback"):
        raise FormatError(f"{p}: a byte-fallback (SentencePiece-style) BPE, not byte-level BPE")
    notes: list[str] = []
    try:
        pattern = _pre_tokenizer_pattern(doc.get("pre_tokenizer"), notes)
    except FormatError as e:
        raise FormatError(f"{p}: {e}") from None
    if doc.get("normalizer") is not None:
        notes.append(f"a {doc['normalizer'].get('type')} normalizer (lmrun does not normalize text)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            notes.append(f"BPE {key}={model[key]!r}")
    if model.get("ignore_merges"):
        notes.append("BPE ignore_merges=true (whole-word vocab lookups before merging)")

    table = set(bytes_to_unicode().values())
    added = sorted(doc.get("added_tokens", []), key=lambda t: t["id"])
    added_ids = {t["content"]: int(t["id"]) for t in added}
    vocab: dict[int, bytes] = {}
    for s, i in model.get("vocab", {}).items():
        if added_ids.get(s) == int(i):
            continue  # an added token's own entry (its text, not its byte-level form); set below
        if not all(ch in table for ch in s):
            raise FormatError(f"{p}: vocab token {s!r} (id {i}) is not in GPT-2's byte-level form")
        vocab[int(i)] = str_to_token(s)
    merges: list[tuple[bytes, bytes]] = []
    for rank, m in enumerate(model.get("merges", [])):
        parts = m.split(" ") if isinstance(m, str) else list(m)
        if len(parts) != 2:
            raise FormatError(f"{p}: merge {rank} {m!r} is not a pair")
        merges.append((str_to_token(parts[0]), str_to_token(parts[1])))
    special_tokens: list[str] = []
    for t in added:
        content, i = t["content"], int(t["id"])
        b = content.encode("utf-8")
        if vocab.setdefault(i, b) != b:
            raise FormatError(f"{p}: added token {content!r} has id {i}, which the vocab gives to {vocab[i]!r}")
        special_tokens.append(content)
        if not t.get("special", False) and t.get("normalized", False) and doc.get("normalizer") is not None:
            notes.append(f"added token {content!r} is matched after normalization")
    return HFTokenizerData(vocab=vocab, merges=merges, special_tokens=special_tokens, pattern=pattern, notes=notes)
