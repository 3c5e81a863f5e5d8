"""PII masking: the formats masked, and near misses that must stay."""
from __future__ import annotations

import pytest

from lmrun.curation.pii import (EMAIL_PLACEHOLDER as E, IP_PLACEHOLDER as I, PHONE_PLACEHOLDER as P, mask_emails,
                                mask_ips, mask_phone_numbers, mask_pii)


def test_mask_emails():
    text, n = mask_emails("Write to john.doe+news@example.co.uk or ADMIN@Example.ORG today.")
    assert (text, n) == (f"Write to {E} or {E} today.", 2)
    for keep in ["user@localhost", "a@b", "@handle", "email me at foo at bar dot com", "x@y.c"]:
        assert mask_emails(keep) == (keep, 0)


@pytest.mark.parametrize("number", ["2831823829", "(283)-182-3829", "(283) 182 3829", "283-182-3829", "283.182.3829",
                                    "+1 283 182 3829", "1-800-555-0199", "+1 (415) 555-2671", "+44 20 7946 0958",
                                    "+49 (30) 1234567", "+33 1 23 45 67 89", "+91 98765 43210"])
def test_mask_phone_numbers(number):
    assert mask_phone_numbers(f"Call {number} now.") == (f"Call {P} now.", 1)


@pytest.mark.parametrize("text", ["Python 3.11.2 was released on 2024-03-01.", "on 12/25/2020 at 10:30",
                                  "timestamp 1617181920", "ISBN 978-3-16-148410-0", "costs $1,234.56",
                                  "version 10.2.3.4567", "call 555-1234", "+12 34", "RFC 2616 section 14.9",
                                  "order 0123456789"])
def test_phone_near_misses_stay(text):
    assert mask_phone_numbers(text) == (text, 0)


def test_mask_ips():
    text, n = mask_ips("hosts 192.168.0.1, 10.0.0.255 and 8.8.8.8.")
    assert (text, n) == (f"hosts {I}, {I} and {I}.", 3)
    for v6 in ["2001:db8::1", "fe80::1%eth0", "::ffff:192.0.2.1", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "::1"]:
        assert mask_ips(f"addr {v6} here") == (f"addr {I} here", 1), v6


@pytest.mark.parametrize("text", ["256.1.1.1", "1.2.3.4.5", "version 3.11.2", "at 12:30:45", "std::vector",
                                  "Class::method", "a::b", "the :: operator", "1.2.3", "dead:beef"])
def test_ip_near_misses_stay(text):
    assert mask_ips(text) == (text, 0)


def test_mask_pii_counts_and_switches():
    text = "Mail a.b@c.org from 10.1.2.3 or call 283-182-3829."
    masked, counts = mask_pii(text)
    assert masked == f"Mail {E} from {I} or call {P}."
    assert counts == {"emails": 1, "phone_numbers": 1, "ips": 1}
    masked, counts = mask_pii(text, emails=False, ips=False)
    assert masked == f"Mail a.b@c.org from 10.1.2.3 or call {P}." and counts["phone_numbers"] == 1
