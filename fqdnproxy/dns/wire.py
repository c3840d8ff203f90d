"""Fast DNS wire parsing for the hot path, and the replies the proxy makes itself.

The proxy needs little from a message: the header, the one question of a query, and from an
answer the A, AAAA and CNAME records of the answer section (RFC 1035 §4.1). This module reads only
that, the way dnspython's ``question_only`` does, and returns frozen dataclasses (named tuples
for the per-record ``Record`` and ``Address``, see there). Everything else
(EDNS OPT, authority, additional) is passed through untouched by the proxy and never parsed here.

Safety rules, because every byte here comes from a pod or an upstream:
- One cursor does every bounds check (``_Cursor.take``, like dnspython's ``Parser.get_bytes``).
- Compression pointers must point strictly before the start of the name being read, and then
  strictly before the previous pointer's target (dnspython's ``biggest_pointer``), so a name read
  is bounded by the message length and loops cannot happen.
- Any stray ``IndexError``/``struct.error``/``UnicodeError`` is converted to ``WireError`` at the
  public boundary: arbitrary bytes only ever raise ``WireError``.

Names are returned in presentation form, lowercased (ASCII only, as DNS compares names), always
with a trailing dot (the root is ``"."``); inside a label ``.`` and ``\\`` are escaped with a
backslash and bytes outside 0x21-0x7e as ``\\DDD`` (decimal), as BIND and dnspython do. For labels
without ``.`` or ``\\`` bytes this equals dnslib's ``str(DNSLabel).lower()``; dnslib does not escape
those two, which makes its text ambiguous.

Use it as ``from fqdnproxy.dns import wire`` and ``wire.parse_query(data)``.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from itertools import repeat
from typing import Final, NamedTuple

from fqdnproxy import ipkey
from fqdnproxy.errors import FqdnproxyError

CLASS_IN: Final = 1
HEADER_SIZE: Final = 12
MAX_NAME_WIRE: Final = 255  # RFC 1035 §2.3.4: a name is at most 255 octets on the wire
MAX_CNAME_HOPS: Final = 16  # CNAMEs followed from the question name; deeper records teach nothing
# RFC 2181 §8: a TTL with the most significant bit set is treated as zero. Applied to Address.ttl
# only; Record.ttl keeps the value on the wire, for the audit log.
MAX_TTL: Final = 0x7FFFFFFF

_QR: Final = 0x8000
_OPCODE_MASK: Final = 0x7800
_AA: Final = 0x0400
_TC: Final = 0x0200
_RD: Final = 0x0100
_RA: Final = 0x0080
_RCODE_MASK: Final = 0x000F

_HEADER = struct.Struct("!6H")
_QUESTION_FIXED = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
# A record whose owner is one compression pointer: the pointer, the fixed fields, and the first
# four bytes of its data (an A record's address).
_RR_POINTED = struct.Struct("!HHHIH4B")
_DECIMAL: Final = tuple(str(b) for b in range(256))  # an IPv4 address's bytes, as inet_ntop writes

# Bytes a label shows as themselves; "." and "\" are escaped, the rest become \DDD.
_PLAIN: Final = bytes(b for b in range(0x21, 0x7F) if b not in (0x2E, 0x5C))
_LOWER_OR_NUL: Final = bytes(
    (b | 0x20 if 0x41 <= b <= 0x5A else b) if b in _PLAIN or b == 0x2E else 0 for b in range(256)
)
_ESCAPED: Final = tuple(
    chr(b) if b in _PLAIN else ("\\" + chr(b) if b in (0x2E, 0x5C) else f"\\{b:03d}")
    for b in range(256)
)


class WireError(FqdnproxyError):
    """Malformed DNS message."""

    def __init__(self, message: str | None = None, *, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset  # where in the message the problem was found, if known


class ShortHeader(WireError):
    """DNS message shorter than its 12-byte header."""


class ShortMessage(WireError):
    """DNS message ends before the data it announces."""


class BadPointer(WireError):
    """Name compression pointer that is out of bounds or does not point strictly backwards."""


class BadLabel(WireError):
    """Name with a reserved label type or longer than 255 bytes."""


class BadQuestionCount(WireError):
    """DNS message with a question count other than the one expected."""


class BadRdata(WireError):
    """Record data of the wrong length for its type."""


# Stray exceptions the parsers convert to WireError at the public boundary.
_STRAY = (IndexError, struct.error, ValueError, UnicodeError, OverflowError)


class Rcode(IntEnum):
    """Response codes the proxy reads or sends (RFC 1035 §4.1.1)."""

    NOERROR = 0  # no error
    FORMERR = 1  # the server could not parse the query
    SERVFAIL = 2  # the server failed (here also: no endpoint, upstream error, map full)
    NXDOMAIN = 3  # the name does not exist (a deny answer, if configured)
    NOTIMP = 4  # the server does not implement this kind of query (opcode)
    REFUSED = 5  # the server refuses for policy reasons (the default deny answer)


class QType(IntEnum):
    """Record types the proxy names in logs and metrics (RFC 1035, 3596, 2782, 6891)."""

    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    MX = 15
    TXT = 16
    AAAA = 28
    SRV = 33
    OPT = 41
    ANY = 255


_QTYPE_NAMES: Final = {member.value: member.name for member in QType}
# Plain ints for the hot loops: comparing against an IntEnum member costs an attribute lookup.
_TYPE_A: Final = int(QType.A)
_TYPE_AAAA: Final = int(QType.AAAA)
_TYPE_CNAME: Final = int(QType.CNAME)
_KEPT_TYPES: Final = frozenset((_TYPE_A, _TYPE_AAAA, _TYPE_CNAME))


def qtype_name(value: int) -> str:
    """Return the mnemonic of a record type, or the RFC 3597 form ``TYPE65`` for unknown ones."""
    return _QTYPE_NAMES.get(value) or f"TYPE{value}"


@dataclass(frozen=True, slots=True)
class Header:
    """The 12-byte message header: the ID, the flags word and the four section counts."""

    id: int
    flags: int
    qdcount: int
    ancount: int
    nscount: int
    arcount: int

    @property
    def qr(self) -> bool:
        """True for a response."""
        return bool(self.flags & _QR)

    @property
    def opcode(self) -> int:
        """The kind of query (0 is QUERY)."""
        return (self.flags & _OPCODE_MASK) >> 11

    @property
    def aa(self) -> bool:
        """Authoritative answer."""
        return bool(self.flags & _AA)

    @property
    def tc(self) -> bool:
        """Truncated: the client should retry over TCP."""
        return bool(self.flags & _TC)

    @property
    def rd(self) -> bool:
        """Recursion desired."""
        return bool(self.flags & _RD)

    @property
    def ra(self) -> bool:
        """Recursion available."""
        return bool(self.flags & _RA)

    @property
    def rcode(self) -> int:
        """The 4-bit response code of the header (extended rcodes live in EDNS, unread here)."""
        return self.flags & _RCODE_MASK


@dataclass(frozen=True, slots=True)
class Question:
    """One question: lowercased presentation name with a trailing dot, type and class."""

    name: str
    qtype: int
    qclass: int


@dataclass(frozen=True, slots=True)
class Query:
    """A query's header and its single question; ``question_end`` is the offset just after it."""

    header: Header
    question: Question
    question_end: int


# Record and Address are named tuples, not slotted dataclasses: an answer of 20 A records makes
# 20 of each, and a named tuple is built in one C call (``tuple.__new__``) where a frozen
# dataclass needs a store per field: measured 200 against 450 ns each, about a fifth of parsing
# such an answer. They are just as immutable; they also compare equal to plain tuples.
class Record(NamedTuple):
    """An A, AAAA or CNAME record of the answer section (class IN), with its data as text.

    ``data`` is a dotted IPv4 address, an RFC 5952 IPv6 address, or a CNAME's target name.
    ``ttl`` is the TTL on the wire.
    """

    name: str
    rtype: int
    ttl: int
    data: str


class Address(NamedTuple):
    """An address the answer gives for the question name; ``ttl`` is the smallest on its chain.

    ``key`` is the address as an ``ipkey`` integer, read from the packed bytes: the form the
    cache and the allow map hold, so the learn stage never parses the text back.
    """

    ip: str
    family: int  # 4 or 6
    ttl: int
    key: int


def address(ip: str, ttl: int) -> Address:
    """The ``Address`` of ``ip`` (IPv4 or IPv6 text, as the parser writes it) with ``ttl``.

    Raises:
        ValueError: ``ip`` is not an IP address.
    """
    return Address(ip, 6 if ":" in ip else 4, ttl, ipkey.key(ip))


@dataclass(frozen=True, slots=True)
class Response:
    """What the proxy needs from an answer: header, question, answer records, chain, addresses."""

    header: Header
    question: Question | None  # None when the response carries no question (qdcount 0)
    records: tuple[Record, ...]
    cnames: tuple[str, ...]  # names the chain reaches from the question name, in order
    addresses: tuple[Address, ...]


# A frozen dataclass's __init__ stores each field through object.__setattr__, about 200 ns a field
# on the benchmark machine: half the cost of parse_query. The parsers build their results through
# the slot descriptors instead, which is what that __setattr__ ends up doing, at a third of the
# cost. The public constructors are unchanged; tests check both ways build equal objects.
_new = object.__new__
_set_h_id, _set_h_flags, _set_h_qd, _set_h_an, _set_h_ns, _set_h_ar = (
    Header.__dict__[name].__set__
    for name in ("id", "flags", "qdcount", "ancount", "nscount", "arcount")
)
_set_q_name, _set_q_type, _set_q_class = (
    Question.__dict__[name].__set__ for name in ("name", "qtype", "qclass")
)
_set_query_header, _set_query_question, _set_query_end = (
    Query.__dict__[name].__set__ for name in ("header", "question", "question_end")
)
_set_resp_header, _set_resp_question, _set_resp_records, _set_resp_cnames, _set_resp_addresses = (
    Response.__dict__[name].__set__
    for name in ("header", "question", "records", "cnames", "addresses")
)
# _new_tuple(Record, (name, rtype, ttl, data)) is Record(name, rtype, ttl, data) without the
# named tuple's Python-level __new__; map() over it builds a section's records in C.
_new_tuple = tuple.__new__


def _header(id_: int, flags: int, qd: int, an: int, ns: int, ar: int) -> Header:
    """Build a Header quickly (see above)."""
    header = _new(Header)
    _set_h_id(header, id_)
    _set_h_flags(header, flags)
    _set_h_qd(header, qd)
    _set_h_an(header, an)
    _set_h_ns(header, ns)
    _set_h_ar(header, ar)
    return header


def _question(name: str, qtype: int, qclass: int) -> Question:
    """Build a Question quickly (see above)."""
    question = _new(Question)
    _set_q_name(question, name)
    _set_q_type(question, qtype)
    _set_q_class(question, qclass)
    return question


def _query(header: Header, question: Question, question_end: int) -> Query:
    """Build a Query quickly (see above)."""
    query = _new(Query)
    _set_query_header(query, header)
    _set_query_question(query, question)
    _set_query_end(query, question_end)
    return query


def query_with_header(query: Query, header: Header) -> Query:
    """``query`` with another header: a repeat of the same message under another ID."""
    return _query(header, query.question, query.question_end)


def response_with_header(response: Response, header: Header) -> Response:
    """``response`` with another header: a repeat of the same message under another ID."""
    new = _new(Response)
    _set_resp_header(new, header)
    _set_resp_question(new, response.question)
    _set_resp_records(new, response.records)
    _set_resp_cnames(new, response.cnames)
    _set_resp_addresses(new, response.addresses)
    return new


class _Cursor:
    """A read position in a message, with one method that does every bounds check."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end  # reads stop here: the message end, or a record's rdata end

    def take(self, n: int) -> int:
        """Step over ``n`` bytes and return the offset where they start.

        Raises:
            ShortMessage: fewer than ``n`` bytes are left before ``end``.
        """
        start = self.pos
        stop = start + n
        if stop > self.end:
            raise ShortMessage(
                f"{n} bytes wanted at offset {start}, data ends at {self.end}", offset=start
            )
        self.pos = stop
        return start


def _read_labels(cur: _Cursor) -> list[bytes]:
    """Read the possibly compressed name at the cursor and leave the cursor just after it."""
    data = cur.data
    take = cur.take
    labels: list[bytes] = []
    wire_len = 1  # the root label's zero byte
    limit = cur.pos  # a pointer must land strictly before this (dnspython's biggest_pointer)
    resume = -1  # where the name ends in the message, once a pointer has been followed
    length = data[take(1)]
    while length:
        if length < 0x40:
            wire_len += length + 1
            if wire_len > MAX_NAME_WIRE:
                raise BadLabel(f"name longer than {MAX_NAME_WIRE} bytes", offset=cur.pos - 1)
            # One bounds check covers the label and the length byte of the next one.
            start = take(length + 1)
            labels.append(data[start : start + length])
            length = data[start + length]
        elif length >= 0xC0:
            at = cur.pos - 1
            target = ((length & 0x3F) << 8) | data[take(1)]
            if target >= len(data):
                raise BadPointer(f"pointer at {at} to {target}, outside the message", offset=at)
            if target < HEADER_SIZE:
                # The header is no name: reading one there would take the ID as a label, and
                # the proxy rewrites the ID before forwarding.
                raise BadPointer(f"pointer at {at} to {target}, inside the header", offset=at)
            if target >= limit:
                raise BadPointer(f"pointer at {at} to {target}, not before {limit}", offset=at)
            if resume < 0:
                resume = cur.pos
            limit = cur.pos = target
            length = data[take(1)]
        else:
            raise BadLabel(f"reserved label type 0x{length & 0xC0:02x}", offset=cur.pos - 1)
    if resume >= 0:
        cur.pos = resume
    return labels


def _skip_name(cur: _Cursor) -> None:
    """Step over the name at the cursor without decoding it or following its pointer."""
    data = cur.data
    while True:
        length = data[cur.take(1)]
        if length == 0:
            return
        if length < 0x40:
            cur.take(length)
        elif length >= 0xC0:
            cur.take(1)
            return
        else:
            raise BadLabel(f"reserved label type 0x{length & 0xC0:02x}", offset=cur.pos - 1)


def _presentation(labels: list[bytes]) -> str:
    """Return the lowercased presentation form of a name, escaped, with a trailing dot."""
    if not labels:
        return "."
    # Fast path: one translate lowercases and turns every byte needing an escape into NUL; a
    # dot inside a label shows as one dot too many.
    joined = b".".join(labels).translate(_LOWER_OR_NUL)
    if b"\x00" not in joined and joined.count(b".") == len(labels) - 1:
        return joined.decode("ascii") + "."
    return ".".join([_escape(bytes(label).lower()) for label in labels]) + "."


def _escape(label: bytes) -> str:
    """Return one label's presentation text, with ``\\.``, ``\\\\`` and ``\\DDD`` escapes."""
    return "".join([_ESCAPED[b] for b in label])


def _read_name(cur: _Cursor) -> str:
    """Read the name at the cursor and return its presentation form."""
    return _presentation(_read_labels(cur))


def _read_question(cur: _Cursor) -> Question:
    """Read one question entry at the cursor."""
    name = _presentation(_read_labels(cur))
    qtype, qclass = _QUESTION_FIXED.unpack_from(cur.data, cur.take(4))
    return _question(name, qtype, qclass)


def _stray(exc: Exception) -> WireError:
    """Wrap an unexpected low-level error so callers only ever see WireError."""
    return WireError(f"malformed message: {exc!r}")


def parse_header(data: bytes) -> Header:
    """Read the message header.

    Raises:
        ShortHeader: ``data`` is shorter than 12 bytes.
    """
    if len(data) < HEADER_SIZE:
        raise ShortHeader(f"{len(data)} bytes, a header needs {HEADER_SIZE}", offset=0)
    return _header(*_HEADER.unpack_from(data))


def parse_query(data: bytes) -> Query:
    """Read a query's header and its single question; the rest (EDNS OPT, ...) is not read.

    Raises:
        WireError: malformed message; ``BadQuestionCount`` unless qdcount is 1.
    """
    try:
        header = parse_header(data)
        if header.qdcount != 1:
            raise BadQuestionCount(f"query with {header.qdcount} questions, expected 1", offset=4)
        cur = _Cursor(data, HEADER_SIZE, len(data))
        question = _read_question(cur)
        return _query(header, question, cur.pos)
    except WireError:
        raise
    except _STRAY as exc:
        raise _stray(exc) from exc


def parse_response(data: bytes) -> Response:
    """Read a response's header, question and answer section and follow its CNAME chain.

    Only class IN A, AAAA and CNAME answer records are decoded; other records are stepped over.
    The authority and additional sections are not read.

    Raises:
        WireError: malformed message (``BadQuestionCount`` for more than one question,
            ``BadRdata`` for an A or AAAA record whose data is not 4 or 16 bytes).
    """
    try:
        header = parse_header(data)
        if header.qdcount > 1:
            raise BadQuestionCount(f"response with {header.qdcount} questions", offset=4)
        cur = _Cursor(data, HEADER_SIZE, len(data))
        question = _read_question(cur) if header.qdcount else None
        records, direct = _read_answers(cur, header.ancount, question.name if question else None)
    except WireError:
        raise
    except _STRAY as exc:
        raise _stray(exc) from exc
    if question is None:
        cnames, addresses = (), ()
    elif direct is not None:  # no CNAME: the chain is the question name alone
        cnames, addresses = (), direct
    else:
        cnames, addresses = _follow_chain(question.name, records)
    response = _new(Response)
    _set_resp_header(response, header)
    _set_resp_question(response, question)
    _set_resp_records(response, records)
    _set_resp_cnames(response, cnames)
    _set_resp_addresses(response, addresses)
    return response


def _read_answers(cur: _Cursor, count: int, qname: str | None
                  ) -> tuple[tuple[Record, ...], tuple[Address, ...] | None]:
    """Read ``count`` records at the cursor, keeping class IN A, AAAA and CNAME records.

    Returns the records and, when none is a CNAME, the addresses ``_follow_chain`` would give
    (those of ``qname``'s records, first seen first, each with its largest TTL), gathered on the
    way; None when there is a CNAME and the chain must be followed.
    """
    if qname is not None and 1 < count < len(_A_BLOCKS):
        block = _read_a_block(cur, count, qname)
        if block is not None:
            return block
    data = cur.data
    end = cur.end
    # Owner names are nearly always one pointer to the question name (c0 0c) or to an earlier
    # owner: decode each pointer target once. Reading a name from offset T, with pointers bound
    # to land before T, gives the same result whoever points at T. Bounded by the message.
    by_target: dict[int, str] = {HEADER_SIZE: qname} if qname is not None else {}
    records: list[Record] = []
    direct: dict[str, Address] | None = {}  # address -> Address, while no CNAME is seen
    unpack_pointed = _RR_POINTED.unpack_from
    pointed_size = _RR_POINTED.size
    for _ in range(count):
        owner_at = pos = cur.pos
        if pos + pointed_size <= end and data[pos] >= 0xC0:
            # The common record: its owner one pointer, then the fixed fields and, for an A
            # record, the address, all read by one unpack (the bytes past a shorter record's
            # data are read but not used).
            pointer, rtype, rclass, ttl, rdlength, b0, b1, b2, b3 = unpack_pointed(data, pos)
            rdata_at = pos + 12
            cur.pos = rdata_at + rdlength
            if cur.pos > end:
                cur.pos = rdata_at
                cur.take(rdlength)  # raises ShortMessage, as everywhere else
            if rclass != CLASS_IN or rtype not in _KEPT_TYPES:
                continue
            target = pointer & 0x3FFF
        else:
            _skip_name(cur)
            bare_pointer = cur.pos - owner_at == 2 and data[owner_at] >= 0xC0
            rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, cur.take(10))
            rdata_at = cur.take(rdlength)
            if rtype not in _KEPT_TYPES or rclass != CLASS_IN:
                continue
            target = ((data[owner_at] & 0x3F) << 8) | data[owner_at + 1] if bare_pointer else -1
            if rtype == _TYPE_A and rdlength == 4:
                b0, b1, b2, b3 = data[rdata_at:rdata_at + 4]
        owner = by_target.get(target) if 0 <= target < owner_at else None
        if owner is None:
            owner = _read_name(_Cursor(data, owner_at, len(data)))
            if target >= 0:
                by_target[target] = owner
        if rtype == _TYPE_A:
            if rdlength != 4:
                raise BadRdata(f"A record with {rdlength} bytes of data", offset=rdata_at)
            text = f"{_DECIMAL[b0]}.{_DECIMAL[b1]}.{_DECIMAL[b2]}.{_DECIMAL[b3]}"
        else:
            text = _rdata_text(data, rtype, rdata_at, rdlength)
            if rtype == _TYPE_CNAME:
                by_target[rdata_at] = text  # the next owner on the chain usually points here
                direct = None
        records.append(_new_tuple(Record, (owner, rtype, ttl, text)))
        if direct is not None and owner == qname:
            if ttl > MAX_TTL:
                ttl = 0  # RFC 2181 §8, as _effective_ttl
            seen = direct.get(text)
            if seen is None or ttl > seen.ttl:
                if rtype == _TYPE_A:
                    direct[text] = _new_tuple(Address, (text, 4, ttl, (
                        b0 << 24 | b1 << 16 | b2 << 8 | b3)))
                else:
                    direct[text] = _new_tuple(Address, (text, 6, ttl, ipkey.V6 | int.from_bytes(
                        data[rdata_at:rdata_at + 16], "big")))
    return tuple(records), (tuple(direct.values()) if direct is not None else None)


# An A answer's records are nearly always all alike: owner a pointer to the question name
# (c0 0c), class IN, type A, 4 bytes of data; 16 bytes each, back to back. Such a section is read
# by one unpack of all its fields (a struct per record count, made at import: a table, not a cache).
_A_RECORD = "HHHIH4B"
_A_RECORD_SIZE: Final = struct.calcsize("!" + _A_RECORD)
_A_BLOCKS: Final = tuple(struct.Struct("!" + _A_RECORD * count) for count in range(33))
_QNAME_POINTER: Final = 0xC000 | HEADER_SIZE


# The same section again, read for each record's address as one integer: its ``ipkey`` key.
_A_KEYS: Final = tuple(struct.Struct("!" + "12xI" * count) for count in range(33))


def _read_a_block(cur: _Cursor, count: int, qname: str
                  ) -> tuple[tuple[Record, ...], tuple[Address, ...]] | None:
    """``_read_answers`` of a section of ``count`` such A records; None if it is not one."""
    pos = cur.pos
    end = pos + _A_RECORD_SIZE * count
    if end > cur.end:
        return None
    f = _A_BLOCKS[count].unpack_from(cur.data, pos)
    if (f[0::9].count(_QNAME_POINTER) != count or f[1::9].count(_TYPE_A) != count
            or f[2::9].count(CLASS_IN) != count or f[4::9].count(4) != count):
        return None
    cur.pos = end
    ttls = f[3::9]
    texts = [f"{_DECIMAL[b0]}.{_DECIMAL[b1]}.{_DECIMAL[b2]}.{_DECIMAL[b3]}"
             for b0, b1, b2, b3 in zip(f[5::9], f[6::9], f[7::9], f[8::9])]
    records = tuple(map(_new_tuple, repeat(Record, count),
                        zip(repeat(qname, count), repeat(_TYPE_A, count), ttls, texts)))
    keys = _A_KEYS[count].unpack_from(cur.data, pos)
    if max(ttls) <= MAX_TTL and len(set(keys)) == count:  # the usual answer: nothing to merge
        return records, tuple(map(_new_tuple, repeat(Address, count),
                                  zip(texts, repeat(4, count), ttls, keys)))
    direct: dict[str, Address] = {}
    for text, ttl, key in zip(texts, ttls, keys):
        if ttl > MAX_TTL:
            ttl = 0  # RFC 2181 §8, as _effective_ttl
        seen = direct.get(text)
        if seen is None or ttl > seen.ttl:
            direct[text] = _new_tuple(Address, (text, 4, ttl, key))
    return records, tuple(direct.values())


def _rdata_text(data: bytes, rtype: int, at: int, length: int) -> str:
    """Return the text of an A, AAAA or CNAME record's data at ``at``."""
    if rtype == _TYPE_A:
        if length != 4:
            raise BadRdata(f"A record with {length} bytes of data", offset=at)
        return socket.inet_ntop(socket.AF_INET, data[at : at + 4])
    if rtype == _TYPE_AAAA:
        if length != 16:
            raise BadRdata(f"AAAA record with {length} bytes of data", offset=at)
        return _ipv6_text(data[at : at + 16])
    cur = _Cursor(data, at, at + length)
    target = _read_name(cur)
    if cur.pos != at + length:
        raise BadRdata(f"CNAME data of {length} bytes holds a {cur.pos - at}-byte name", offset=at)
    return target


def _ipv6_text(packed: bytes) -> str:
    """Return the RFC 5952 text of a 16-byte address, as ``ipaddress`` writes it."""
    text = socket.inet_ntop(socket.AF_INET6, packed)
    # inet_ntop writes IPv4-mapped and -compatible addresses with a dotted tail; ipaddress does
    # not. Use one spelling so the cache and the allow map never hold two keys for one address.
    return text if "." not in text else str(ipaddress.IPv6Address(bytes(packed)))


def _follow_chain(qname: str, records: tuple[Record, ...]) -> tuple[tuple[str, ...], tuple[Address, ...]]:
    """Follow CNAMEs from ``qname`` and collect the addresses of the names on the chain.

    At most MAX_CNAME_HOPS CNAMEs are followed and a name already on the chain ends it, so a loop
    costs nothing. If an owner has several CNAMEs (invalid, RFC 2181 §10.1) the first one counts.
    An address's TTL is the smallest TTL on the chain leading to it, its own included. When an
    address appears more than once on the chain it keeps the largest such TTL: that is what the
    cache would keep if it learned the two separately (a repeat never shortens a lifetime), and it
    makes the result independent of record order.
    """
    first_cname: dict[str, Record] = {}
    for record in records:
        if record.rtype == _TYPE_CNAME:
            first_cname.setdefault(record.name, record)
    chain_ttl = {qname: MAX_TTL}  # name on the chain -> smallest TTL on the way to it
    cnames: list[str] = []
    name, ttl = qname, MAX_TTL
    for _ in range(MAX_CNAME_HOPS):
        cname = first_cname.get(name)
        if cname is None:
            break
        name, ttl = cname.data, min(ttl, _effective_ttl(cname.ttl))
        if name in chain_ttl:
            break
        chain_ttl[name] = ttl
        cnames.append(name)
    best: dict[str, Address] = {}
    for record in records:
        if record.rtype == _TYPE_CNAME or record.name not in chain_ttl:
            continue
        ttl = min(chain_ttl[record.name], _effective_ttl(record.ttl))
        seen = best.get(record.data)
        if seen is None or ttl > seen.ttl:
            best[record.data] = address(record.data, ttl)
    return tuple(cnames), tuple(best.values())


def _effective_ttl(ttl: int) -> int:
    """Return the TTL to honour: RFC 2181 §8 treats values above 2**31 - 1 as zero."""
    return ttl if ttl <= MAX_TTL else 0


def with_id(data: bytes, new_id: int) -> bytes:
    """Return the same message with its ID replaced.

    Raises:
        ShortHeader: ``data`` is shorter than a header.
        ValueError: ``new_id`` is not a 16-bit value.
    """
    if len(data) < HEADER_SIZE:
        raise ShortHeader(f"{len(data)} bytes, a header needs {HEADER_SIZE}", offset=0)
    if not 0 <= new_id <= 0xFFFF:
        raise ValueError(f"DNS ID out of range: {new_id}")
    return new_id.to_bytes(2, "big") + data[2:]


def question_matches(a: Question, b: Question) -> bool:
    """True if two questions ask the same thing (names are already lowercased)."""
    return a.name == b.name and a.qtype == b.qtype and a.qclass == b.qclass


def _reply_flags(header: Header, rcode: Rcode) -> int:
    """Flags of a reply to ``header``: QR and RA set, opcode and RD echoed, the given rcode."""
    return _QR | (header.flags & (_OPCODE_MASK | _RD)) | _RA | (int(rcode) & _RCODE_MASK)


def build_reply(query: Query, data: bytes, rcode: Rcode) -> bytes:
    """Return a reply to ``query`` (whose bytes are ``data``) echoing its question, no records."""
    header = query.header
    head = _HEADER.pack(header.id, _reply_flags(header, rcode), 1, 0, 0, 0)
    return head + data[HEADER_SIZE : query.question_end]


def build_header_only_reply(header: Header, rcode: Rcode) -> bytes:
    """Return a question-less reply, for when only the header of a query could be read."""
    return _HEADER.pack(header.id, _reply_flags(header, rcode), 0, 0, 0, 0)


def refused(query: Query, data: bytes) -> bytes:
    """Return a REFUSED reply to ``query``."""
    return build_reply(query, data, Rcode.REFUSED)


def nxdomain(query: Query, data: bytes) -> bytes:
    """Return an NXDOMAIN reply to ``query``."""
    return build_reply(query, data, Rcode.NXDOMAIN)


def servfail(query: Query, data: bytes) -> bytes:
    """Return a SERVFAIL reply to ``query``."""
    return build_reply(query, data, Rcode.SERVFAIL)


def formerr(header: Header) -> bytes:
    """Return a question-less FORMERR reply to a query whose header alone could be read."""
    return build_header_only_reply(header, Rcode.FORMERR)
