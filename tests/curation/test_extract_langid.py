"""HTML extraction and language id on real pages and hand-made edge cases."""
from __future__ import annotations

from tests.conftest import EXAMPLE_PAGES, FIXTURES

from lmrun.curation.extract import decode_html_bytes, extract_text_from_html_bytes
from lmrun.curation.langid import identify_language


def test_extract_real_page():
    text = extract_text_from_html_bytes((EXAMPLE_PAGES / "moby.html").read_bytes())
    assert "Moby" in text and "<" not in text and "</" not in text


def test_extract_python_docs_page_main_content():
    html = (EXAMPLE_PAGES / "getpass.html").read_bytes()
    full = extract_text_from_html_bytes(html)
    main = extract_text_from_html_bytes(html, main_content=True)
    assert "Prompt the user for a password without echoing" in main
    assert len(main) < len(full)  # navigation and footer dropped


def test_extract_encodings():
    page = "<html><body><p>Café déjà vu — naïve</p></body></html>"
    assert extract_text_from_html_bytes(page.encode("utf-8")) == "Café déjà vu — naïve"
    latin = "<html><head><meta charset='iso-8859-1'></head><body><p>Café déjà</p></body></html>".encode("latin-1")
    assert extract_text_from_html_bytes(latin) == "Café déjà"
    assert extract_text_from_html_bytes("\ufeff<p>bom</p>".encode("utf-8")) == "bom"
    utf16 = "<html><head><meta charset='utf-16'></head><body><p>wide text</p></body></html>".encode("utf-16")
    assert "wide text" in (extract_text_from_html_bytes(utf16) or "")


def test_extract_empty_and_bad_input_never_crash():
    assert extract_text_from_html_bytes(b"") == ""
    assert extract_text_from_html_bytes(b"   \n") == ""
    assert extract_text_from_html_bytes(b"<html><body></body></html>") == ""
    assert extract_text_from_html_bytes(None) is None
    assert decode_html_bytes("not bytes") is None
    out = extract_text_from_html_bytes(bytes(range(256)) * 10)  # binary junk: decoded as cp1252 or None
    assert out is None or isinstance(out, str)


def test_identify_language():
    en = "The quick brown fox jumps over the lazy dog, and the dog did not seem to mind at all."
    de = (FIXTURES / "enc_german.txt").read_text(encoding="utf-8")
    lang, score = identify_language(en)
    assert lang == "en" and 0.9 < score <= 1.0
    lang, score = identify_language(de)
    assert lang == "de" and score > 0.9
    assert identify_language("12345 !!! ---") == ("unknown", 0.0)
    assert identify_language("") == ("unknown", 0.0)
    lang, _ = identify_language("これは日本語の文章です。今日は天気がいいですね。")
    assert lang == "ja"
