"""Cilium-compatible ``matchName`` / ``matchPattern`` validation, translation and matching.

Semantics (Cilium ``pkg/fqdn/matchpattern``, including the ``**.`` prefix of Cilium 1.19):

- Names and patterns are trimmed, lowercased and given a trailing dot.
- ``matchName`` is exact. Only ``[-a-zA-Z0-9_.]`` is allowed.
- In ``matchPattern`` (``[-a-zA-Z0-9_.*]``) a run of ``*`` matches zero or more of
  ``[-a-z0-9_]`` inside one label; it never crosses a dot, so ``**`` in the middle is just ``*``.
- A leading run of two or more ``*`` followed by ``.`` matches one or more whole, non-empty labels:
  ``**.cilium.io`` matches ``a.cilium.io.`` and ``a.b.cilium.io.`` but not ``cilium.io.``.
- A pattern of only ``*`` (optionally with a trailing dot) matches every name made of valid
  labels, and the root ``.``.
- At most 255 characters; no empty labels.

``to_regex`` is the literal translation (kept as the reference the tests check the fast matcher
against). ``NameMatcher`` is what the engine uses: every selector of one endpoint compiled into
one structure, an exact-name dict plus a trie over reversed labels, so matching a name costs a
few dict lookups whatever the number of selectors, never a loop over regexes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterable

from fqdnproxy.errors import FqdnproxyError

MAX_LENGTH = 255  # Cilium's MaxFQDNLength for matchName and matchPattern
MATCH_ALL = "*"  # the normalized form of every all-star pattern

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_PATTERN_CHARS = _NAME_CHARS | {"*"}
_LABEL_CLASS = "[-a-z0-9_]"  # Cilium's allowedDNSCharsREGroup, on lowercased text
_BAD_LABEL_CHAR = re.compile(r"[^-a-z0-9_]")
_VALID_NAME = re.compile(r"(?:[-a-z0-9_]+\.)+|\.")
_ALL_STARS = re.compile(r"\*+\.?")
_MULTI_PREFIX = re.compile(r"\*{2,}\.")
_STAR_RUN = re.compile(r"\*+")


class MatchError(FqdnproxyError):
    """Invalid matchName or matchPattern."""

    def __init__(self, text: str, problem: str) -> None:
        super().__init__(f"{json.dumps(text)} {problem}")
        self.text = text
        self.problem = problem


def normalize_name(name: str) -> str:
    """Lowercase ``name`` and give it a trailing dot (``""`` becomes the root ``"."``)."""
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


def _validate(text: str, allowed: frozenset[str], what: str) -> str:
    stripped = text.strip()
    if not stripped:
        raise MatchError(text, "is empty")
    if len(stripped) > MAX_LENGTH:
        raise MatchError(text, f"is {len(stripped)} characters long; at most {MAX_LENGTH} are allowed")
    for char in text:
        if char not in allowed:
            if char == "*":
                raise MatchError(text, 'contains "*"; matchName is exact, use matchPattern for wildcards')
            raise MatchError(text, f"contains {json.dumps(char)}; only letters, digits and {what} are allowed")
    body = stripped[:-1] if stripped.endswith(".") else stripped
    if body == "" or "" in body.split("."):
        raise MatchError(text, "has an empty label; labels are separated by single dots")
    return stripped


def validate_name(text: str) -> str:
    """Validate a ``matchName`` and return its normalized form. Raises: MatchError."""
    return normalize_name(_validate(text, _NAME_CHARS, "- _ ."))


def validate_pattern(text: str) -> str:
    """Validate a ``matchPattern`` and return its normalized form. Raises: MatchError."""
    stripped = _validate(text, _PATTERN_CHARS, "- _ . *")
    if _ALL_STARS.fullmatch(stripped):
        return MATCH_ALL
    return normalize_name(stripped)


def to_regex(pattern: str) -> str:
    """The anchored regex of a normalized pattern, as Cilium's ``ToAnchoredRegexp`` builds it."""
    if pattern == MATCH_ALL:
        return rf"(?:{_LABEL_CLASS}+[.])+|[.]"
    out = []
    lead = _MULTI_PREFIX.match(pattern)
    if lead:
        out.append(rf"{_LABEL_CLASS}+(?:[.]{_LABEL_CLASS}+)*[.]")
        pattern = pattern[lead.end():]
    for piece in re.split(r"(\*+|\.)", pattern):
        if piece == ".":
            out.append("[.]")
        elif piece.startswith("*"):
            out.append(f"{_LABEL_CLASS}*")
        else:
            out.append(re.escape(piece))
    return "".join(out)


@dataclass(slots=True)
class _Glob:
    """A label with ``*`` inside (``api-*``); its regex is compiled on first use."""

    text: str
    node: "_Node"
    _regex: re.Pattern[str] | None = None

    def fullmatch(self, label: str) -> bool:
        if self._regex is None:
            self._regex = re.compile("".join(
                f"{_LABEL_CLASS}*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", self.text)))
        return self._regex.fullmatch(label) is not None


@dataclass(slots=True)
class _Node:
    """One position in the reversed-label trie; values end here or continue below."""

    literal: dict[str, "_Node"] = field(default_factory=dict)
    star: "_Node | None" = None  # a label of only "*": any label of valid chars, even empty
    globs: dict[str, _Glob] = field(default_factory=dict)  # "api-*" style labels by text
    by_prefix: dict[str, list[_Glob]] = field(default_factory=dict)
    prefix_lengths: tuple[int, ...] = ()
    by_suffix: dict[str, list[_Glob]] = field(default_factory=dict)
    suffix_lengths: tuple[int, ...] = ()
    inner: list[_Glob] = field(default_factory=list)  # "*a*": no literal prefix or suffix
    end: list[int] = field(default_factory=list)  # patterns that consumed exactly all labels
    multi: list[int] = field(default_factory=list)  # "**." patterns: one or more labels remain

    def index_globs(self) -> None:
        """Index glob labels by literal prefix (else suffix) so lookup is a few dict probes."""
        for glob_text, glob in self.globs.items():
            first, _, rest = glob_text.partition("*")
            last = rest.rpartition("*")[2] if "*" in rest else rest
            if first:
                self.by_prefix.setdefault(first, []).append(glob)
            elif last:
                self.by_suffix.setdefault(last, []).append(glob)
            else:
                self.inner.append(glob)
        self.prefix_lengths = tuple(sorted({len(key) for key in self.by_prefix}))
        self.suffix_lengths = tuple(sorted({len(key) for key in self.by_suffix}))
        for child in self._children():
            child.index_globs()

    def _children(self) -> Iterable["_Node"]:
        yield from self.literal.values()
        if self.star is not None:
            yield self.star
        for glob in self.globs.values():
            yield glob.node

    def glob_matches(self, label: str) -> Iterable["_Node"]:
        size = len(label)
        for length in self.prefix_lengths:
            if length > size:
                break
            for glob in self.by_prefix.get(label[:length], ()):
                if glob.fullmatch(label):
                    yield glob.node
        for length in self.suffix_lengths:
            if length > size:
                break
            for glob in self.by_suffix.get(label[size - length:], ()):
                if glob.fullmatch(label):
                    yield glob.node
        for glob in self.inner:
            if glob.fullmatch(label):
                yield glob.node


class NameMatcher:
    """Every name selector of one endpoint, compiled; ``match`` returns the values selecting a name.

    Build with ``add_name``/``add_pattern`` (normalized forms, see ``validate_*``) then ``freeze``.
    Cost of ``match``: one dict lookup for exact names plus a walk of the trie that probes one dict
    per label and per glob prefix length, independent of the number of selectors.
    """

    def __init__(self) -> None:
        self._exact: dict[str, list[int]] = {}
        self._match_all: list[int] = []
        self._root = _Node()
        self._has_trie = False
        self._frozen = False

    def add_name(self, name: str, value: int) -> None:
        """Select the normalized ``name`` exactly."""
        self._exact.setdefault(name, []).append(value)

    def add_pattern(self, pattern: str, value: int) -> None:
        """Select what the normalized ``pattern`` matches."""
        if self._frozen:
            raise RuntimeError("NameMatcher is frozen")
        if pattern == MATCH_ALL:
            self._match_all.append(value)
            return
        if "*" not in pattern:
            self.add_name(pattern, value)
            return
        multi = False
        lead = _MULTI_PREFIX.match(pattern)
        if lead:
            multi = True
            pattern = pattern[lead.end():]
        node = self._root
        for label in reversed(pattern[:-1].split(".") if pattern != "." else []):
            if "*" not in label:
                node = node.literal.setdefault(label, _Node())
            elif _STAR_RUN.fullmatch(label):
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                label = _STAR_RUN.sub("*", label)
                glob = node.globs.get(label)
                if glob is None:
                    glob = node.globs[label] = _Glob(label, _Node())
                node = glob.node
        (node.multi if multi else node.end).append(value)
        self._has_trie = True

    def freeze(self) -> "NameMatcher":
        """Finish building (indexes glob labels); returns self."""
        if not self._frozen:
            self._root.index_globs()
            self._frozen = True
        return self

    def __bool__(self) -> bool:
        return bool(self._exact or self._match_all or self._has_trie)

    def match(self, name: str) -> set[int]:
        """The values of every selector that selects ``name`` (any case, trailing dot optional)."""
        if not name.endswith(".") or not name.islower():
            name = normalize_name(name)
        found: set[int] = set()
        exact = self._exact.get(name)
        if exact:
            found.update(exact)
        if self._match_all and _VALID_NAME.fullmatch(name):
            found.update(self._match_all)
        if self._has_trie:
            self._walk(name, found)
        return found

    def _walk(self, name: str, found: set[int]) -> None:
        labels = name[:-1].split(".") if name != "." else []
        valid_upto = -1  # labels[:i] are all valid and non-empty iff i <= valid_upto
        stack = [(self._root, len(labels))]
        while stack:
            node, remaining = stack.pop()
            if remaining == 0:
                found.update(node.end)
                continue
            if node.multi:
                if valid_upto < 0:
                    valid_upto = _valid_prefix(labels)
                if remaining <= valid_upto:
                    found.update(node.multi)
            label = labels[remaining - 1]
            child = node.literal.get(label)
            if child is not None:
                stack.append((child, remaining - 1))
            if node.star is not None and not _BAD_LABEL_CHAR.search(label):
                stack.append((node.star, remaining - 1))
            if node.globs:
                for child in node.glob_matches(label):
                    stack.append((child, remaining - 1))


def _valid_prefix(labels: list[str]) -> int:
    """The largest i such that labels[:i] are all non-empty and of valid characters."""
    for index, label in enumerate(labels):
        if not label or _BAD_LABEL_CHAR.search(label):
            return index
    return len(labels)
