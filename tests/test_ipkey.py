"""ipkey.py: one key per address whatever its spelling, text back as the wire parser writes it."""

from __future__ import annotations

import ipaddress

import pytest

from fqdnproxy import ipkey


@pytest.mark.parametrize("text, canonical", [
    ("192.0.2.1", "192.0.2.1"),
    ("0.0.0.0", "0.0.0.0"),
    ("255.255.255.255", "255.255.255.255"),
    ("2001:db8::1", "2001:db8::1"),
    ("2001:DB8:0:0::1", "2001:db8::1"),
    ("::", "::"),
    ("::ffff:192.0.2.1", "::ffff:c000:201"),  # mapped: no dotted tail, as ipaddress writes it
    ("::192.0.2.1", "::c000:201"),
])
def test_round_trip(text: str, canonical: str) -> None:
    key = ipkey.key(text)
    assert ipkey.text(key) == canonical == str(ipaddress.ip_address(text))
    family, value = ipkey.split(key)
    assert (family, value) == (ipaddress.ip_address(text).version, int(ipaddress.ip_address(text)))


def test_families_never_share_a_key() -> None:
    assert ipkey.key("192.0.2.1") != ipkey.key("::c000:201")


@pytest.mark.parametrize("text", ["", "192.0.2", "192.0.2.256", "2001:db8:::1", "example.com"])
def test_bad_text_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        ipkey.key(text)
