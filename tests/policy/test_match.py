"""matchName / matchPattern: Cilium's semantics, validation, and the one-matcher compilation."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fqdnproxy.policy import match

# (pattern, name, selected?) -- every rule of DESIGN.md "Policy semantics".
PATTERN_CASES = [
    # "*" matches zero or more characters inside one label only
    ("*.github.com", "api.github.com.", True),
    ("*.github.com", "a.b.github.com.", False),
    ("*.github.com", "github.com.", False),
    ("*github.com", "github.com.", True),
    ("*github.com", "www.github.com.", False),
    ("sub*.cilium.io", "sub.cilium.io.", True),
    ("sub*.cilium.io", "subdomain.cilium.io.", True),
    ("sub*.cilium.io", "www.cilium.io.", False),
    ("special*service.api.cilium.io", "special-foo-service.api.cilium.io.", True),
    ("special*service.api.cilium.io", "special.x.service.api.cilium.io.", False),
    ("api.*.example", "api.v1.example.", True),
    ("api.*.example", "api.v1.v2.example.", False),
    # a leading "**." is one or more whole labels
    ("**.cilium.io", "a.cilium.io.", True),
    ("**.cilium.io", "a.b.c.cilium.io.", True),
    ("**.cilium.io", "cilium.io.", False),
    ("***.cilium.io", "a.b.cilium.io.", True),
    ("**.cluster.local", "kube-dns.kube-system.svc.cluster.local.", True),
    # "**" anywhere else is a plain "*": within one label
    ("a.**.example", "a.b.example.", True),
    ("a.**.example", "a.b.c.example.", False),
    ("x**y.example", "xzzy.example.", True),
    ("**foo.example", "barfoo.example.", True),
    ("**foo.example", "a.foo.example.", False),
    # all-star patterns match every name (of valid labels) and the root
    ("*", "anything.example.", True),
    ("*", "a.b.c.d.e.", True),
    ("*", ".", True),
    ("**", "a.b.", True),
    ("*.", "a.b.", True),
    ("***.", "a.", True),
    ("*", "bad name.example.", False),
    # case and trailing dots
    ("*.GitHub.COM", "API.github.com", True),
    ("api.demo.test.", "api.demo.test", True),
    ("api.demo.test", "API.DEMO.TEST.", True),
    # underscore is a DNS character here
    ("*.example.com", "_srv._tcp.example.com.", False),
    ("_*.example.com", "_srv.example.com.", True),
    ("**.example.com", "_srv._tcp.example.com.", True),
    # characters outside the allowed set never match a wildcard
    ("*.example.com", "a+b.example.com.", False),
    ("**.example.com", "a/b.x.example.com.", False),
]


@pytest.mark.parametrize("pattern,name,selected", PATTERN_CASES)
def test_pattern_semantics(pattern: str, name: str, selected: bool) -> None:
    matcher = match.NameMatcher()
    matcher.add_pattern(match.validate_pattern(pattern), 1)
    assert (matcher.freeze().match(name) == {1}) is selected
    # The fast matcher and Cilium's regex translation agree.
    regex = match.to_regex(match.validate_pattern(pattern))
    assert bool(re.fullmatch(regex, match.normalize_name(name))) is selected


@pytest.mark.parametrize("name,query,selected", [
    ("api.github.com", "api.github.com.", True),
    ("API.GitHub.com.", "api.github.com", True),
    ("api.github.com", "x.api.github.com.", False),
    ("api.github.com", "github.com.", False),
    ("_dmarc.example.com", "_dmarc.example.com.", True),
])
def test_match_name_is_exact(name: str, query: str, selected: bool) -> None:
    matcher = match.NameMatcher()
    matcher.add_name(match.validate_name(name), 7)
    assert (matcher.freeze().match(query) == {7}) is selected


@pytest.mark.parametrize("kind,text,message", [
    ("pattern", "*.ex ample.com", '"*.ex ample.com" contains " "; only letters, digits and - _ . * are allowed'),
    ("pattern", "a+b.com", '"a+b.com" contains "+"; only letters, digits and - _ . * are allowed'),
    ("pattern", "[a].com", '"[a].com" contains "["; only letters, digits and - _ . * are allowed'),
    ("name", "*.example.com", '"*.example.com" contains "*"; matchName is exact, use matchPattern for wildcards'),
    ("name", "ex ample.com", '"ex ample.com" contains " "; only letters, digits and - _ . are allowed'),
    ("name", "é.example", '"\\u00e9.example" contains "\\u00e9"; only letters, digits and - _ . are allowed'),
    ("name", "a" * 252 + ".com", f'"{"a" * 252}.com" is 256 characters long; at most 255 are allowed'),
    ("pattern", "*" + "a" * 255, f'"*{"a" * 255}" is 256 characters long; at most 255 are allowed'),
    ("name", "a..com", '"a..com" has an empty label; labels are separated by single dots'),
    ("pattern", ".example.com", '".example.com" has an empty label; labels are separated by single dots'),
    ("name", "", '"" is empty'),
])
def test_validation_messages(kind: str, text: str, message: str) -> None:
    validate = match.validate_name if kind == "name" else match.validate_pattern
    with pytest.raises(match.MatchError) as error:
        validate(text)
    assert str(error.value) == message


def test_255_characters_are_allowed() -> None:
    name = ("a" * 63 + ".") * 3 + "a" * 63  # 255 characters
    assert len(name) == 255
    assert match.validate_name(name) == name + "."


@pytest.mark.parametrize("text,normalized", [
    ("*", "*"), ("**", "*"), ("*.", "*"), ("***.", "*"),
    ("*.Example.COM", "*.example.com."), ("**.cilium.io.", "**.cilium.io."),
])
def test_pattern_normalization(text: str, normalized: str) -> None:
    assert match.validate_pattern(text) == normalized


def test_every_selector_value_is_returned() -> None:
    matcher = match.NameMatcher()
    patterns = ["api.demo.test", "*.demo.test", "**.test", "*", "api*.demo.test", "*i.demo.test", "*p*.demo.test"]
    for value, pattern in enumerate(patterns):
        matcher.add_pattern(match.validate_pattern(pattern), value)
    matcher.freeze()
    assert matcher.match("api.demo.test.") == set(range(len(patterns)))
    assert matcher.match("www.demo.test.") == {1, 2, 3}
    assert matcher.match("demo.test.") == {2, 3}
    assert matcher.match("example.") == {3}


def test_ten_thousand_selectors_compile_into_one_fast_matcher() -> None:
    matcher = match.NameMatcher()
    started = time.perf_counter()
    for i in range(10_000):
        kind = i % 4
        text = [f"host{i}.example.com", f"*.svc{i}.example.com", f"**.zone{i}.example", f"api{i}-*.example.org"][kind]
        matcher.add_pattern(match.validate_pattern(text), i)
    matcher.freeze()
    assert time.perf_counter() - started < 1.0
    assert matcher.match("host4.example.com.") == {4}
    assert matcher.match("x.svc5.example.com.") == {5}
    assert matcher.match("a.b.zone6.example.") == {6}
    assert matcher.match("api7-eu.example.org.") == {7}
    assert matcher.match("api7.example.org.") == set()
    started = time.perf_counter()
    for _ in range(1000):
        matcher.match("a.b.zone6.example.")
    assert (time.perf_counter() - started) / 1000 < 100e-6  # microseconds, not a regex loop


_LABELS = st.sampled_from(["a", "b", "ab", "ba", "aab", "_", "x-y", "A", "", "a b", "*", "**", "a*", "*b", "a*b", "*a*"])
_NAME_LABELS = st.sampled_from(["a", "b", "ab", "ba", "aab", "abb", "_", "x-y", "A", "", "a b", "a+b"])


@st.composite
def _patterns(draw: st.DrawFn) -> str:
    labels = draw(st.lists(_LABELS.filter(lambda x: x not in ("", "a b")), min_size=1, max_size=4))
    prefix = draw(st.sampled_from(["", "", "**.", "***."]))
    return prefix + ".".join(labels) + draw(st.sampled_from(["", "."]))


@given(st.lists(_patterns(), min_size=1, max_size=8),
       st.lists(_NAME_LABELS, min_size=0, max_size=5).map(lambda ls: ".".join(ls) + "."))
@settings(max_examples=400, deadline=None)
def test_matcher_agrees_with_cilium_regex(patterns: list[str], name: str) -> None:
    matcher = match.NameMatcher()
    expected = set()
    normalized_name = match.normalize_name(name)
    for value, text in enumerate(patterns):
        pattern = match.validate_pattern(text)
        matcher.add_pattern(pattern, value)
        if re.fullmatch(match.to_regex(pattern), normalized_name):
            expected.add(value)
    assert matcher.freeze().match(name) == expected
