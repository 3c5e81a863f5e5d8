"""PII masking: e-mail addresses, phone numbers and IP addresses -> fixed placeholders.

Each function returns ``(masked_text, number_of_replacements)``. The patterns aim at
precision on real web text: version numbers (``3.11.2``), dates (``2024-03-01``,
``12/25/2020``), times (``12:30:45``), prices and long identifiers are not masked.
Sources: CS336 assignment 4 (the placeholders), NANP numbering rules for US/Canadian numbers,
ITU-T E.164 (at most 15 digits) for international numbers, RFC 4291 (IPv6 text forms,
validated with Python's ``ipaddress``).
"""
from __future__ import annotations

import ipaddress
import re

EMAIL_PLACEHOLDER = "|||EMAIL_ADDRESS|||"
PHONE_PLACEHOLDER = "|||PHONE_NUMBER|||"
IP_PLACEHOLDER = "|||IP_ADDRESS|||"

_EMAIL_RE = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b")

# US / NANP: optional +1 or 1, area code [2-9]XX (optionally in parentheses), exchange XXX,
# line XXXX; separators space, dot or hyphen (also none: 2831823829).
_US_PHONE_RE = re.compile(
    r"(?<![\w+.\-/])"
    r"(?:\+?1[\s.\-]?)?"
    r"(?:\([2-9]\d{2}\)[\s.\-]?|[2-9]\d{2}[\s.\-]?)"
    r"\d{3}[\s.\-]?\d{4}"
    r"(?![\w\-/]|\.\d)")
# International: a leading + and country code, then groups of digits separated by a space,
# dot or hyphen (an area code may be in parentheses); 8 to 15 digits in all (E.164).
_INTL_PHONE_RE = re.compile(
    r"(?<![\w+])\+[1-9]\d{0,2}(?:[\s.\-]?\(?\d{1,5}\)?){1,6}(?![\w\-/]|\.\d)")

_IPV4_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4_RE = re.compile(rf"(?<![\w.]){_IPV4_OCTET}(?:\.{_IPV4_OCTET}){{3}}(?![\w]|\.\d)")
_IPV6_CANDIDATE_RE = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}|:)?(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.\d{1,3}){0,3}(?:%[\w.]+)?(?![\w:]|\.\d)")


def mask_emails(text: str) -> tuple[str, int]:
    """Replace e-mail addresses (local@domain.tld) with ``|||EMAIL_ADDRESS|||``."""
    return _EMAIL_RE.subn(EMAIL_PLACEHOLDER, text)


def _intl_ok(m: re.Match) -> bool:
    digits = sum(ch.isdigit() for ch in m.group(0))
    return 8 <= digits <= 15


def mask_phone_numbers(text: str) -> tuple[str, int]:
    """Replace phone numbers with ``|||PHONE_NUMBER|||``: US/Canadian numbers in the common
    forms (``(283) 182-3829``, ``283-182-3829``, ``283.182.3829``, ``2831823829``,
    ``+1 283 182 3829``, ``1-800-555-0199``) and international numbers written with a leading
    ``+`` and country code (``+44 20 7946 0958``, ``+49 (30) 1234567``, 8-15 digits).
    Numbers whose area code starts with 0 or 1 (e.g. Unix timestamps), 7-digit local numbers,
    dates and version numbers are not masked; a bare 10-digit number with a NANP area code
    (e.g. 2147483647) is."""
    count = 0

    def intl(m: re.Match) -> str:
        nonlocal count
        if not _intl_ok(m):
            return m.group(0)
        count += 1
        return PHONE_PLACEHOLDER

    text = _INTL_PHONE_RE.sub(intl, text)
    text, n = _US_PHONE_RE.subn(PHONE_PLACEHOLDER, text)
    return text, count + n


def _ipv6_ok(candidate: str) -> bool:
    core = candidate.split("%", 1)[0]
    if not any(ch.isdigit() for ch in core) or (core.count(":") < 3 and "::" not in core):
        return False  # "::", "ab::cd" (C++ scopes, words) are not masked
    if core.count(":") < 3 and not any(ch.isdigit() for ch in core.replace("::", "")):
        return False
    try:
        ipaddress.IPv6Address(core)
    except ValueError:
        return False
    return True


def mask_ips(text: str) -> tuple[str, int]:
    """Replace IPv4 addresses (four dotted octets 0-255, not part of a longer dotted number)
    and IPv6 addresses (any RFC 4291 text form that ``ipaddress.IPv6Address`` accepts,
    including ``::`` compression, IPv4-mapped forms and zone ids; at least one digit and not a
    bare ``::``) with ``|||IP_ADDRESS|||``. Times such as ``12:30:45`` are not valid IPv6 and
    stay. A four-part version number (``1.2.3.4``) is indistinguishable from an IPv4 address
    and is masked."""
    count = 0

    def v6(m: re.Match) -> str:
        nonlocal count
        if _ipv6_ok(m.group(0)):
            count += 1
            return IP_PLACEHOLDER
        return m.group(0)

    text = _IPV6_CANDIDATE_RE.sub(v6, text)
    text, n = _IPV4_RE.subn(IP_PLACEHOLDER, text)
    return text, count + n


def mask_pii(text: str, emails: bool = True, phone_numbers: bool = True, ips: bool = True) -> tuple[str, dict]:
    """Apply the enabled maskers in the order e-mail, IP, phone (an IP's digits are never
    read as a phone number). Returns the text and ``{"emails", "phone_numbers", "ips"}`` counts."""
    counts = {"emails": 0, "phone_numbers": 0, "ips": 0}
    if emails:
        text, counts["emails"] = mask_emails(text)
    if ips:
        text, counts["ips"] = mask_ips(text)
    if phone_numbers:
        text, counts["phone_numbers"] = mask_phone_numbers(text)
    return text, counts
