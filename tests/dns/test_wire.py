"""Tests for the hot-path DNS wire parser: known messages, hostile bytes, and property tests.

Known messages are built with dnslib, the way a pod or an upstream would send them; hostile ones
are written by hand. The property tests check that the parser agrees with what was encoded and
with dnslib's own parse, and that arbitrary or mangled bytes only ever raise ``WireError``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

import pytest
from dnslib import AAAA, CNAME, DNSHeader, DNSQuestion, DNSRecord, EDNS0, MX, QTYPE, RR, TXT, A
from dnslib.label import DNSLabel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fqdnproxy.dns import wire

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers -------------------------------------------------------------------------------------


def addr(ip: str, ttl: int) -> wire.Address:
    """The Address the parser should give for ``ip``: its key computed apart from ``ipkey``."""
    parsed = ipaddress.ip_address(ip)
    return wire.Address(ip, parsed.version, ttl, int(parsed) + (2**128 if parsed.version == 6 else 0))


def presentation(labels: list[bytes] | tuple[bytes, ...]) -> str:
    """Reference presentation form: lowercased, BIND escapes, trailing dot."""
    if not labels:
        return "."
    out = []
    for label in labels:
        text = ""
        for byte in label.lower():
            if byte in b".\\":
                text += "\\" + chr(byte)
            elif 0x21 <= byte <= 0x7E:
                text += chr(byte)
            else:
                text += f"\\{byte:03d}"
        out.append(text)
    return ".".join(out) + "."


def encode_name(labels: list[bytes] | tuple[bytes, ...]) -> bytes:
    """Uncompressed wire form of a name."""
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def header(id_: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!6H", id_, flags, qd, an, ns, ar)


def question_bytes(labels: list[bytes], qtype: int = 1, qclass: int = 1) -> bytes:
    return encode_name(labels) + struct.pack("!HH", qtype, qclass)


def rr_bytes(owner: bytes, rtype: int, ttl: int, rdata: bytes, rclass: int = 1) -> bytes:
    """A record whose owner is given in wire form (so it may be a pointer)."""
    return owner + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def query(name: str = "www.example.com", qtype: str | int = "A", edns: bool = False) -> bytes:
    q = DNSRecord(DNSHeader(id=0xBEEF, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype) if isinstance(qtype, str) else qtype))
    if edns:
        q.add_ar(EDNS0(udp_len=1232))
    return q.pack()


def response(qname: str, answers: list[RR], qtype: str = "A") -> bytes:
    r = DNSRecord(DNSHeader(id=0x4242, qr=1, rd=1, ra=1), q=DNSQuestion(qname, getattr(QTYPE, qtype)))
    for answer in answers:
        r.add_answer(answer)
    return r.pack()


def rr(owner: str, rtype: str, ttl: int, rdata) -> RR:
    return RR(owner, getattr(QTYPE, rtype), ttl=ttl, rdata=rdata)


# --- header, names and queries -----------------------------------------------------------------


def test_header_fields_and_flags():
    data = header(id_=7, flags=0x8000 | (2 << 11) | 0x0400 | 0x0200 | 0x0100 | 0x0080 | 3, qd=1, an=2, ns=3, ar=4)
    h = wire.parse_header(data)
    assert (h.id, h.qdcount, h.ancount, h.nscount, h.arcount) == (7, 1, 2, 3, 4)
    assert (h.qr, h.opcode, h.aa, h.tc, h.rd, h.ra, h.rcode) == (True, 2, True, True, True, True, 3)
    h0 = wire.parse_header(header(flags=0))
    assert (h0.qr, h0.opcode, h0.aa, h0.tc, h0.rd, h0.ra, h0.rcode) == (False, 0, False, False, False, False, 0)


@pytest.mark.parametrize(
    "name, qtype, expected_name, expected_type",
    [
        ("www.example.com", "A", "www.example.com.", 1),
        ("www.example.com.", "AAAA", "www.example.com.", 28),
        ("ExAmPle.COM", "MX", "example.com.", 15),
        ("_sip._tcp.example.com", "SRV", "_sip._tcp.example.com.", 33),
        ("example.com", "TXT", "example.com.", 16),
        ("example.com", "ANY", "example.com.", 255),
        ("example.com", 65, "example.com.", 65),
        (".", "NS", ".", 2),
        ("a-b_c.x1", "CNAME", "a-b_c.x1.", 5),
    ],
)
def test_parse_query_known(name, qtype, expected_name, expected_type):
    data = query(name, qtype)
    q = wire.parse_query(data)
    assert q.header.id == 0xBEEF and q.header.rd and not q.header.qr and q.header.qdcount == 1
    assert q.question == wire.Question(expected_name, expected_type, wire.CLASS_IN)
    assert q.question_end == len(data)


def test_parse_query_edns_leaves_the_opt_record_alone():
    data = query("Example.org", "AAAA", edns=True)
    q = wire.parse_query(data)
    assert q.question == wire.Question("example.org.", 28, 1)
    assert q.header.arcount == 1
    assert q.question_end == 12 + len(encode_name([b"example", b"org"])) + 4 < len(data)


@pytest.mark.parametrize(
    "labels, expected",
    [
        ([b"a.b", b"com"], "a\\.b.com."),
        ([b"back\\slash"], "back\\\\slash."),
        ([b"sp ace"], "sp\\032ace."),
        ([b"\x00\xff", b"x"], "\\000\\255.x."),
        ([b"caf\xc3\xa9"], "caf\\195\\169."),
        ([b"UPPER\x7f"], "upper\\127."),
        ([b"!~\"#"], "!~\"#."),
        ([b"*", b"example"], "*.example."),
    ],
)
def test_names_are_escaped_like_bind(labels, expected):
    data = header() + question_bytes(labels)
    assert wire.parse_query(data).question.name == expected
    assert presentation(labels) == expected


@pytest.mark.parametrize("labels", [[b"sp ace", b"caf\xc3\xa9"], [b"MiXeD", b"tab\tx"], [b"\x01"], [b"x*y"]])
def test_names_agree_with_dnslib_where_dnslib_is_unambiguous(labels):
    data = header() + question_bytes(labels)
    dnslib_name = str(DNSRecord.parse(data).q.qname).lower()
    assert wire.parse_query(data).question.name == dnslib_name


def test_longest_legal_name():
    labels = [b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61]  # 3*64 + 62 + 1 = 255 bytes
    assert len(encode_name(labels)) == 255
    assert wire.parse_query(header() + question_bytes(labels)).question.name == presentation(labels)


def test_question_matches():
    a = wire.Question("example.com.", 1, 1)
    assert wire.question_matches(a, wire.Question("example.com.", 1, 1))
    assert not wire.question_matches(a, wire.Question("example.org.", 1, 1))
    assert not wire.question_matches(a, wire.Question("example.com.", 28, 1))
    assert not wire.question_matches(a, wire.Question("example.com.", 1, 3))


@pytest.mark.parametrize("value, name", [(1, "A"), (28, "AAAA"), (255, "ANY"), (41, "OPT"), (65, "TYPE65"), (0, "TYPE0")])
def test_qtype_name(value, name):
    assert wire.qtype_name(value) == name


def test_results_are_frozen_and_fast_builders_agree_with_constructors():
    data = response("a.example", [rr("a.example", "A", 5, A("192.0.2.1"))])
    r = wire.parse_response(data)
    assert r.header == wire.Header(0x4242, r.header.flags, 1, 1, 0, 0)
    assert hash(r.header) == hash(wire.Header(*dataclasses.astuple(r.header)))
    assert r.question == wire.Question("a.example.", 1, 1)
    assert r.records == (wire.Record("a.example.", 1, 5, "192.0.2.1"),)
    q = wire.parse_query(query())
    assert q == wire.Query(q.header, wire.Question("www.example.com.", 1, 1), q.question_end)
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.header.id = 1  # type: ignore[misc]
    assert not hasattr(q, "__dict__")
    # Record and Address are named tuples: as immutable, built without a store per field.
    with pytest.raises(AttributeError):
        r.records[0].ttl = 1  # type: ignore[misc]
    assert not hasattr(r.records[0], "__dict__") and not hasattr(r.addresses[0], "__dict__")
    assert r.addresses == (wire.address("192.0.2.1", 5),) == (addr("192.0.2.1", 5),)


@pytest.mark.parametrize("ip", ["192.0.2.1", "0.0.0.0", "255.255.255.255", "2001:db8::1", "::",
                                "::ffff:c000:201", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"])
def test_an_address_key_is_ipkeys(ip: str) -> None:
    from fqdnproxy import ipkey

    assert wire.address(ip, 7) == addr(ip, 7)
    assert wire.address(ip, 7).key == ipkey.key(ip)


# --- responses ------------------------------------------------------------------------------------


def test_response_cname_chain_followed_with_min_ttl():
    data = response(
        "www.Example.com",
        [
            rr("www.example.com", "CNAME", 300, CNAME("Edge.Cdn.NET")),
            rr("edge.cdn.net", "CNAME", 60, CNAME("e1.cdn.net")),
            rr("e1.cdn.net", "A", 3600, A("192.0.2.1")),
            rr("e1.cdn.net", "A", 30, A("192.0.2.2")),
            rr("e1.cdn.net", "AAAA", 120, AAAA("2001:db8::1")),
        ],
    )
    r = wire.parse_response(data)
    assert r.cnames == ("edge.cdn.net.", "e1.cdn.net.")
    assert r.records[0] == wire.Record("www.example.com.", 5, 300, "edge.cdn.net.")
    assert r.addresses == (
        addr("192.0.2.1", 60),
        addr("192.0.2.2", 30),
        addr("2001:db8::1", 60),
    )


def test_response_off_chain_records_teach_nothing():
    data = response(
        "www.example.com",
        [
            rr("www.example.com", "A", 100, A("192.0.2.1")),
            rr("evil.example", "A", 100, A("198.51.100.66")),
            rr("other.example", "CNAME", 100, CNAME("www.example.com")),
            rr("evil.example", "CNAME", 100, CNAME("elsewhere.example")),
        ],
    )
    r = wire.parse_response(data)
    assert len(r.records) == 4
    assert r.cnames == ()
    assert r.addresses == (addr("192.0.2.1", 100),)


def test_response_cname_loop_is_bounded():
    data = response(
        "a.loop",
        [
            rr("a.loop", "CNAME", 50, CNAME("b.loop")),
            rr("b.loop", "CNAME", 40, CNAME("a.loop")),
            rr("b.loop", "A", 90, A("192.0.2.9")),
        ],
    )
    r = wire.parse_response(data)
    assert r.cnames == ("b.loop.",)
    # Only a -> b leads to b; b -> a closes the loop and is not on the way.
    assert r.addresses == (addr("192.0.2.9", 50),)


def test_response_chain_longer_than_16_hops_stops():
    names = [f"n{i}.chain" for i in range(20)]
    answers = [rr(names[i], "CNAME", 100, CNAME(names[i + 1])) for i in range(19)]
    answers += [rr(names[16], "A", 100, A("192.0.2.16")), rr(names[17], "A", 100, A("192.0.2.17"))]
    r = wire.parse_response(response(names[0], answers))
    assert len(r.cnames) == wire.MAX_CNAME_HOPS == 16
    assert r.cnames[-1] == names[16] + "."
    assert [a.ip for a in r.addresses] == ["192.0.2.16"]


def test_response_duplicate_ip_keeps_largest_chain_ttl():
    data = response(
        "www.example.com",
        [
            rr("www.example.com", "CNAME", 10, CNAME("edge.example.net")),
            rr("edge.example.net", "A", 500, A("192.0.2.1")),  # chain min 10
            rr("www.example.com", "A", 200, A("192.0.2.1")),  # directly: 200
        ],
    )
    assert wire.parse_response(data).addresses == (addr("192.0.2.1", 200),)


def test_response_ttl_with_top_bit_counts_as_zero():
    data = response("x.example", [rr("x.example", "A", 0x80000000, A("192.0.2.1"))])
    r = wire.parse_response(data)
    assert r.records[0].ttl == 0x80000000
    assert r.addresses == (addr("192.0.2.1", 0),)


def test_response_100_a_records():
    ips = [f"198.51.100.{i}" for i in range(100)]
    data = response("many.example", [rr("many.example", "A", 60 + i, A(ip)) for i, ip in enumerate(ips)])
    r = wire.parse_response(data)
    assert r.header.ancount == 100
    assert [a.ip for a in r.addresses] == ips
    assert [a.ttl for a in r.addresses] == [60 + i for i in range(100)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2001:db8::1", "2001:db8::1"),
        ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
        # Spelled as ipaddress spells them (Python 3.13 writes the mapped one with a dotted tail).
        ("::ffff:192.0.2.1", str(ipaddress.IPv6Address("::ffff:192.0.2.1"))),
        ("::192.0.2.1", "::c000:201"),
        ("::", "::"),
        ("::1", "::1"),
        ("2001:db8:1:1:1:1:1:0", "2001:db8:1:1:1:1:1:0"),
    ],
)
def test_aaaa_text_is_ipaddress_canonical(text, expected):
    packed = ipaddress.IPv6Address(text).packed
    data = response("six.example", [rr("six.example", "AAAA", 1, AAAA(list(packed)))], qtype="AAAA")
    r = wire.parse_response(data)
    assert r.records[0].data == expected == str(ipaddress.IPv6Address(text))
    assert r.addresses == (addr(expected, 1),)


def test_response_skips_other_types_and_sections():
    r = DNSRecord(DNSHeader(id=1, qr=1), q=DNSQuestion("mx.example", QTYPE.MX))
    r.add_answer(rr("mx.example", "MX", 10, MX("mail.example")))
    r.add_answer(rr("mx.example", "TXT", 10, TXT("hello")))
    r.add_answer(rr("mx.example", "A", 10, A("192.0.2.3")))
    r.add_ar(rr("mail.example", "A", 10, A("192.0.2.25")))
    r.add_ar(EDNS0())
    parsed = wire.parse_response(r.pack())
    assert parsed.records == (wire.Record("mx.example.", 1, 10, "192.0.2.3"),)
    assert parsed.addresses == (addr("192.0.2.3", 10),)


def test_response_non_in_class_records_are_skipped():
    data = header(flags=0x8180, an=1) + question_bytes([b"x"]) + rr_bytes(b"\xc0\x0c", 1, 5, b"\x01\x02\x03", rclass=3)
    r = wire.parse_response(data)
    assert r.records == () and r.addresses == ()


def test_response_without_question():
    data = header(flags=0x8182, qd=0, an=1) + rr_bytes(encode_name([b"x"]), 1, 5, bytes(4))
    r = wire.parse_response(data)
    assert r.question is None and r.cnames == () and r.addresses == ()
    assert r.records == (wire.Record("x.", 1, 5, "0.0.0.0"),)
    assert r.header.rcode == wire.Rcode.SERVFAIL


def test_compressed_and_uncompressed_parse_alike():
    answers = [
        (b"\xc0\x0c", [b"www", b"example", b"com"], 5, 300, encode_name([b"edge", b"example", b"net"])),
    ]
    plain = (
        header(flags=0x8180, an=3)
        + question_bytes([b"www", b"example", b"com"])
        + rr_bytes(encode_name([b"www", b"example", b"com"]), 5, 300, encode_name([b"edge", b"example", b"net"]))
        + rr_bytes(encode_name([b"edge", b"example", b"net"]), 1, 60, bytes([192, 0, 2, 1]))
        + rr_bytes(encode_name([b"edge", b"example", b"net"]), 28, 60, ipaddress.IPv6Address("2001:db8::5").packed)
    )
    del answers
    compressed = response(
        "www.example.com",
        [
            rr("www.example.com", "CNAME", 300, CNAME("edge.example.net")),
            rr("edge.example.net", "A", 60, A("192.0.2.1")),
            rr("edge.example.net", "AAAA", 60, AAAA("2001:db8::5")),
        ],
    )
    assert len(compressed) < len(plain)
    a, b = wire.parse_response(plain), wire.parse_response(compressed)
    assert (a.question, a.records, a.cnames, a.addresses) == (b.question, b.records, b.cnames, b.addresses)
    assert a.addresses == (addr("192.0.2.1", 60), addr("2001:db8::5", 60))


def test_cname_target_compressed_against_earlier_suffix():
    # CNAME target "cdn.example.com" written as label "cdn" + pointer to "example.com" at 16.
    data = (
        header(flags=0x8180, an=2)
        + question_bytes([b"www", b"example", b"com"])
        + rr_bytes(b"\xc0\x0c", 5, 30, b"\x03cdn\xc0\x10")
        + rr_bytes(b"\xc0\x2d", 1, 20, bytes([192, 0, 2, 7]))
    )
    r = wire.parse_response(data)
    assert r.cnames == ("cdn.example.com.",)
    assert r.addresses == (addr("192.0.2.7", 20),)
    assert DNSRecord.parse(data).rr[1].rname == "cdn.example.com"


# --- errors -----------------------------------------------------------------------------------------


HOSTILE = [
    ("empty", b"", wire.ShortHeader),
    ("11 bytes", header()[:11], wire.ShortHeader),
    ("header only", header(qd=1), wire.ShortMessage),
    ("qdcount 0", header(qd=0) + question_bytes([b"a"]), wire.BadQuestionCount),
    ("qdcount 2", header(qd=2) + question_bytes([b"a"]) * 2, wire.BadQuestionCount),
    ("truncated label", header() + b"\x05abc", wire.ShortMessage),
    ("missing qtype", header() + encode_name([b"a"]) + b"\x00", wire.ShortMessage),
    ("pointer to itself", header() + b"\xc0\x0c\x00\x01\x00\x01", wire.BadPointer),
    ("forward pointer", header() + b"\xc0\x0e\x00\x01\x00\x01\x01a\x00", wire.BadPointer),
    ("out of bounds pointer", header() + b"\xff\xff\x00\x01\x00\x01", wire.BadPointer),
    ("pointer into own labels", header() + b"\x01a\xc0\x0c\x00\x01\x00\x01", wire.BadPointer),
    ("truncated pointer", header() + b"\x01a\xc0", wire.ShortMessage),
    ("label type 01", header() + b"\x41" + b"a" * 65 + b"\x00\x00\x01\x00\x01", wire.BadLabel),
    ("label type 10", header() + b"\x80\x00\x00\x01\x00\x01", wire.BadLabel),
    ("name of 256 bytes", header() + question_bytes([b"a" * 63] * 3 + [b"b" * 62]), wire.BadLabel),
    ("name of 321 bytes", header() + question_bytes([b"a" * 63] * 5), wire.BadLabel),
]


@pytest.mark.parametrize("label, data, error", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_parse_query_rejects(label, data, error):
    with pytest.raises(error):
        wire.parse_query(data)


def _answer(*records: bytes, qd: int = 1, an: int | None = None) -> bytes:
    return header(flags=0x8180, qd=qd, an=len(records) if an is None else an) + question_bytes([b"q", b"example"]) + b"".join(records)


RESPONSE_HOSTILE = [
    ("qdcount 2", header(flags=0x8180, qd=2) + question_bytes([b"a"]) * 2, wire.BadQuestionCount),
    ("ancount past end", _answer(rr_bytes(b"\xc0\x0c", 1, 1, bytes(4)), an=2), wire.ShortMessage),
    ("truncated rdata", _answer(rr_bytes(b"\xc0\x0c", 1, 1, bytes(4)))[:-2], wire.ShortMessage),
    ("truncated fixed part", _answer(rr_bytes(b"\xc0\x0c", 1, 1, bytes(4)))[:-8], wire.ShortMessage),
    ("A with 5 bytes", _answer(rr_bytes(b"\xc0\x0c", 1, 1, bytes(5))), wire.BadRdata),
    ("A with 0 bytes", _answer(rr_bytes(b"\xc0\x0c", 1, 1, b"")), wire.BadRdata),
    ("AAAA with 4 bytes", _answer(rr_bytes(b"\xc0\x0c", 28, 1, bytes(4))), wire.BadRdata),
    ("CNAME with trailing bytes", _answer(rr_bytes(b"\xc0\x0c", 5, 1, encode_name([b"x"]) + b"zz")), wire.BadRdata),
    ("CNAME running past rdata", _answer(rr_bytes(b"\xc0\x0c", 5, 1, b"\x05ab")) + b"cdef\x00", wire.ShortMessage),
    ("owner pointer forward", _answer(rr_bytes(b"\xc0\x40", 1, 1, bytes(4))), wire.BadPointer),
    ("owner pointer to itself", _answer(rr_bytes(b"\xc0\x1b", 1, 1, bytes(4))), wire.BadPointer),
    ("owner bad label type", _answer(rr_bytes(b"\x40", 1, 1, bytes(4))), wire.BadLabel),
    # Two names pointing at each other: 27 -> 31 is forward, so it is rejected before any loop.
    ("mutual pointers", _answer(rr_bytes(b"\xc0\x1f", 1, 1, bytes(4)), rr_bytes(b"\xc0\x1b", 1, 1, bytes(4))), wire.BadPointer),
    ("skipped type with bad owner", _answer(rr_bytes(b"\x80", 16, 1, b"\x01x")), wire.BadLabel),
]


@pytest.mark.parametrize("label, data, error", RESPONSE_HOSTILE, ids=[h[0] for h in RESPONSE_HOSTILE])
def test_parse_response_rejects(label, data, error):
    with pytest.raises(error):
        wire.parse_response(data)


def test_record_fast_path_agrees_with_the_general_one():
    """A record with 16 bytes or more from its start, owned by a pointer, is read by one unpack;
    nearer the end, by the cursor. Padding after the last record moves every record to the
    first way: results and errors (type, offset) must not change."""
    truncating = {"ancount past end", "truncated rdata", "truncated fixed part",
                  "CNAME running past rdata"}  # padding would complete these
    cases = [data for label, data, _ in RESPONSE_HOSTILE if label not in truncating] + [
        _answer(*(rr_bytes(b"\xc0\x0c", 1, 1, bytes([192, 0, 2, n])) for n in range(20))),
        _answer(rr_bytes(b"\xc0\x0c", 5, 60, b"\xc0\x0c")),  # 14 bytes: the general path
        _answer(rr_bytes(b"\xc0\x0c", 5, 60, encode_name([b"t", b"example"])),
                rr_bytes(b"\xc0\x27", 1, 2**31, bytes([198, 51, 100, 7])),
                rr_bytes(b"\xc0\x27", 28, 5, bytes(range(16)))),
        _answer(rr_bytes(b"\xc0\x0c", 1, 1, bytes(4), rclass=3), rr_bytes(b"\xc0\x0c", 16, 1, b"\x01x")),
        _answer(rr_bytes(encode_name([b"q", b"example"]), 1, 7, bytes([203, 0, 113, 9]))),
    ]

    def outcome(data: bytes):
        try:
            r = wire.parse_response(data)
        except wire.WireError as error:
            return type(error), error.offset  # the text may name the message's length
        return r.records, r.cnames, r.addresses

    for data in cases:
        assert outcome(data) == outcome(data + bytes(16)) == outcome(data + b"\xff" * 40)
    # rdata running past the end, with 16 bytes or more left: the error of the cursor.
    record = rr_bytes(b"\xc0\x0c", 1, 1, bytes(4))
    data = _answer(record[:10] + (100).to_bytes(2, "big") + record[12:]) + bytes(16)
    with pytest.raises(wire.ShortMessage) as caught:
        wire.parse_response(data)
    assert caught.value.offset == 39 and str(caught.value) == (
        f"100 bytes wanted at offset 39, data ends at {len(data)}")


@given(st.lists(st.tuples(st.sampled_from([0, 1, 60, 2**31, 2**32 - 1]), st.integers(0, 3)),
                min_size=2, max_size=34),
       st.integers(0, 40), st.sampled_from([b"", bytes(16)]))
def test_a_block_agrees_with_the_record_by_record_way(rows, odd, tail):
    """A section of pointer-owned IN A records is read by one unpack (``_read_a_block``); with
    one record unlike the rest, or cut short, it is read record by record. Both ways give the
    same records, addresses (duplicates keep their largest TTL) and errors."""
    records = [rr_bytes(b"\xc0\x0c", 1, ttl, bytes([192, 0, 2, n])) for ttl, n in rows]
    if odd < len(records):  # another type, class, owner or length in the middle
        records[odd] = [rr_bytes(b"\xc0\x0c", 28, 5, bytes(16)),
                        rr_bytes(b"\xc0\x0c", 1, 5, bytes(4), rclass=3),
                        rr_bytes(encode_name([b"q", b"example"]), 1, 7, bytes(4)),
                        rr_bytes(b"\xc0\x0c", 1, 5, bytes(4))[:-1]][odd % 4]
    data = _answer(*records) + tail

    def outcome():
        try:
            r = wire.parse_response(data)
        except wire.WireError as error:
            return type(error), error.offset
        return r.records, r.cnames, r.addresses

    by_block = outcome()
    saved = wire._A_BLOCKS
    wire._A_BLOCKS = ()  # no count fits: every section goes record by record
    try:
        assert by_block == outcome()
    finally:
        wire._A_BLOCKS = saved


def test_errors_share_one_base_and_carry_offsets():
    for error in (wire.ShortHeader, wire.ShortMessage, wire.BadPointer, wire.BadLabel, wire.BadQuestionCount, wire.BadRdata):
        assert issubclass(error, wire.WireError)
    from fqdnproxy.errors import FqdnproxyError

    assert issubclass(wire.WireError, FqdnproxyError)
    with pytest.raises(wire.BadPointer) as caught:
        wire.parse_query(header() + b"\xc0\x0c\x00\x01\x00\x01")
    assert caught.value.offset == 12 and "pointer" in str(caught.value)
    assert str(wire.ShortHeader()) == "DNS message shorter than its 12-byte header."


# --- builders ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rcode", list(wire.Rcode))
def test_build_reply(rcode):
    data = query("WWW.Example.com", "AAAA", edns=True)
    q = wire.parse_query(data)
    reply = wire.build_reply(q, data, rcode)
    parsed = DNSRecord.parse(reply)
    assert parsed.header.id == 0xBEEF
    assert (parsed.header.qr, parsed.header.ra, parsed.header.rd, parsed.header.opcode) == (1, 1, 1, 0)
    assert parsed.header.rcode == rcode
    assert (parsed.header.q, parsed.header.a, parsed.header.auth, parsed.header.ar) == (1, 0, 0, 0)
    assert reply[12:] == data[12 : q.question_end]  # question bytes echoed, case included
    r = wire.parse_response(reply)
    assert wire.question_matches(r.question, q.question) and r.header.rcode == rcode


def test_build_reply_echoes_opcode_and_rd_clear():
    data = header(flags=(4 << 11)) + question_bytes([b"zone"], 6)
    reply = wire.build_reply(wire.parse_query(data), data, wire.Rcode.NOTIMP)
    h = wire.parse_header(reply)
    assert (h.qr, h.opcode, h.rd, h.ra, h.rcode) == (True, 4, False, True, 4)


def test_convenience_replies():
    data = query()
    q = wire.parse_query(data)
    assert wire.parse_header(wire.refused(q, data)).rcode == wire.Rcode.REFUSED
    assert wire.parse_header(wire.nxdomain(q, data)).rcode == wire.Rcode.NXDOMAIN
    assert wire.parse_header(wire.servfail(q, data)).rcode == wire.Rcode.SERVFAIL


def test_header_only_reply():
    h = wire.parse_header(header(id_=99, flags=0x0100, qd=1) + b"\xff")
    reply = wire.formerr(h)
    assert len(reply) == 12
    parsed = wire.parse_header(reply)
    assert (parsed.id, parsed.qr, parsed.rd, parsed.opcode, parsed.rcode) == (99, True, True, 0, 1)
    assert (parsed.qdcount, parsed.ancount, parsed.nscount, parsed.arcount) == (0, 0, 0, 0)
    assert wire.build_header_only_reply(h, wire.Rcode.SERVFAIL) == reply[:3] + bytes([0x82]) + reply[4:]


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bytes_like_inputs(kind):
    data = header(flags=0x8180, an=1) + question_bytes([b"Odd.", b"x"]) + rr_bytes(b"\xc0\x0c", 28, 9, bytes(16))
    r = wire.parse_response(kind(data))
    assert r.question.name == "odd\\..x." and r.addresses == (addr("::", 9),)
    assert wire.parse_query(kind(data)).question == r.question


def test_with_id():
    data = query(edns=True)
    swapped = wire.with_id(data, 0x0102)
    assert swapped[:2] == b"\x01\x02" and swapped[2:] == data[2:]
    assert wire.parse_query(swapped).header.id == 0x0102
    with pytest.raises(wire.ShortHeader):
        wire.with_id(b"\x00" * 11, 1)
    with pytest.raises(ValueError):
        wire.with_id(data, 0x10000)


# --- property tests -----------------------------------------------------------------------------------

_LDH = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
labels_st = st.one_of(
    st.text(alphabet=_LDH, min_size=1, max_size=20).map(str.encode),
    st.binary(min_size=1, max_size=12),  # odd bytes: NUL, dots, backslashes, non-UTF-8
    st.sampled_from([b"a.b", b"\\", b"caf\xc3\xa9", b"x" * 63, b"*"]),
)
names_st = st.lists(labels_st, min_size=0, max_size=5).filter(lambda ls: len(encode_name(ls)) <= 255)
ttl_st = st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def answer_st(draw):
    """A question plus a random answer section: a CNAME chain, addresses on and off it."""
    qname = draw(names_st)
    pool = [qname] + draw(st.lists(names_st, min_size=0, max_size=4))
    records = []
    for _ in range(draw(st.integers(0, 12))):
        owner = draw(st.sampled_from(pool))
        # Owners in other case show names compare case-insensitively.
        if draw(st.booleans()):
            owner = [label.upper() for label in owner]
        kind = draw(st.sampled_from(["A", "AAAA", "CNAME", "TXT"]))
        ttl = draw(ttl_st)
        if kind == "A":
            value = draw(st.binary(min_size=4, max_size=4))
        elif kind == "AAAA":
            value = draw(st.binary(min_size=16, max_size=16))
        elif kind == "CNAME":
            value = draw(st.sampled_from(pool))
        else:
            value = draw(st.binary(min_size=0, max_size=20))
        records.append((owner, kind, ttl, value))
    return qname, draw(st.sampled_from([1, 28, 5, 255])), records, draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))


def dnslib_message(qname, qtype, records, id_, flags) -> bytes:
    """The message as dnslib packs it: names compressed."""
    msg = DNSRecord(DNSHeader(id=id_, bitmap=flags), q=DNSQuestion(DNSLabel(tuple(qname)), qtype))
    for owner, kind, ttl, value in records:
        if kind == "A":
            rdata = A(tuple(value))
        elif kind == "AAAA":
            rdata = AAAA(tuple(value))
        elif kind == "CNAME":
            rdata = CNAME(DNSLabel(tuple(value)))
        else:
            rdata = TXT([value])
        msg.add_answer(RR(DNSLabel(tuple(owner)), getattr(QTYPE, kind), ttl=ttl, rdata=rdata))
    return msg.pack()


def plain_message(qname, qtype, records, id_, flags) -> bytes:
    """The same message with no name compression."""
    codes = {"A": 1, "AAAA": 28, "CNAME": 5, "TXT": 16}
    out = header(id_, flags, 1, len(records)) + question_bytes(qname, qtype)
    for owner, kind, ttl, value in records:
        if kind == "CNAME":
            rdata = encode_name(value)
        elif kind == "TXT":
            rdata = bytes([len(value)]) + value
        else:
            rdata = value
        out += rr_bytes(encode_name(owner), codes[kind], ttl, rdata)
    return out


def utf8(labels) -> bool:
    """dnslib refuses to parse labels that are not valid UTF-8."""
    try:
        for label in labels:
            label.decode()
    except UnicodeDecodeError:
        return False
    return True


def expected_records(records):
    out = []
    for owner, kind, ttl, value in records:
        if kind == "A":
            out.append(wire.Record(presentation(owner), 1, ttl, str(ipaddress.IPv4Address(value))))
        elif kind == "AAAA":
            out.append(wire.Record(presentation(owner), 28, ttl, str(ipaddress.IPv6Address(value))))
        elif kind == "CNAME":
            out.append(wire.Record(presentation(owner), 5, ttl, presentation(value)))
    return tuple(out)


def expected_chain(qname: str, records: tuple[wire.Record, ...]):
    """Reference semantics: walk at most 16 CNAMEs, first CNAME per owner, stop on a repeat."""
    path = [(qname, 2**31 - 1)]
    for _ in range(16):
        name, ttl = path[-1]
        nxt = next((r for r in records if r.rtype == 5 and r.name == name), None)
        if nxt is None or any(nxt.data == seen for seen, _ in path):
            break
        path.append((nxt.data, min(ttl, nxt.ttl if nxt.ttl < 2**31 else 0)))
    best: dict[str, wire.Address] = {}
    for r in records:
        if r.rtype == 5:
            continue
        ttls = [ttl for name, ttl in path if name == r.name]
        if not ttls:
            continue
        ttl = min(ttls[0], r.ttl if r.ttl < 2**31 else 0)
        if r.data not in best or best[r.data].ttl < ttl:
            best[r.data] = addr(r.data, ttl)
    return tuple(name for name, _ in path[1:]), tuple(best.values())


@PROPERTY
@given(answer_st())
def test_property_response_agrees_with_encoding_and_dnslib(message):
    qname, qtype, records, id_, flags = message
    compressed = dnslib_message(*message)
    plain = plain_message(*message)
    want_records = expected_records(records)
    want_cnames, want_addresses = expected_chain(presentation(qname), want_records)
    # Trailing bytes (unread: arcount is 0) put every record on the one-unpack path.
    for data in (compressed, plain, compressed + bytes(16)):
        r = wire.parse_response(data)
        assert (r.header.id, r.header.flags, r.header.ancount) == (id_, flags, len(records))
        assert r.question == wire.Question(presentation(qname), qtype, 1)
        assert r.records == want_records
        assert r.cnames == want_cnames
        assert r.addresses == want_addresses
    # dnslib's own reading of the compressed message agrees, where it can read it (it rejects
    # labels that are not UTF-8) and its text is unambiguous (no "." or "\" inside labels).
    try:
        theirs = DNSRecord.parse(compressed)
    except Exception:
        names = [qname] + [owner for owner, *_ in records] + [v for _, kind, _, v in records if kind == "CNAME"]
        assert not all(utf8(name) for name in names), "dnslib rejected a message it should read"
        return
    assert (theirs.header.id, theirs.header.bitmap) == (id_, flags)
    assert theirs.q.qtype == qtype and theirs.q.qclass == 1
    assert presentation(theirs.q.qname.label) == r.question.name
    kept = [x for x in theirs.rr if x.rtype in (1, 5, 28) and x.rclass == 1]
    assert len(kept) == len(r.records)
    for mine, other in zip(r.records, kept):
        assert (mine.name, mine.rtype, mine.ttl) == (presentation(other.rname.label), other.rtype, other.ttl)
        if other.rtype == 5:
            assert mine.data == presentation(other.rdata.label.label)
        else:
            assert ipaddress.ip_address(mine.data) == ipaddress.ip_address(str(other.rdata))
        if not any(b"." in label or b"\\" in label for label in other.rname.label):
            assert mine.name == str(other.rname).lower()


@PROPERTY
@given(names_st, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.booleans())
def test_property_query_agrees_with_encoding_and_dnslib(qname, qtype, id_, flags, edns):
    msg = DNSRecord(DNSHeader(id=id_, bitmap=flags), q=DNSQuestion(DNSLabel(tuple(qname)), qtype))
    if edns:
        msg.add_ar(EDNS0())
    data = msg.pack()
    q = wire.parse_query(data)
    assert (q.header.id, q.header.flags) == (id_, flags)
    assert q.question == wire.Question(presentation(qname), qtype, 1)
    assert q.question_end == 12 + len(encode_name(qname)) + 4
    assert wire.parse_response(data).question == q.question
    try:
        theirs = DNSRecord.parse(data)
    except Exception:
        assert not utf8(qname), "dnslib rejected a message it should read"
        return
    assert presentation(theirs.q.qname.label) == q.question.name
    if not any(b"." in label or b"\\" in label for label in qname):
        assert q.question.name == str(theirs.q.qname).lower()


def _only_wire_errors(data: bytes) -> None:
    for parse in (wire.parse_header, wire.parse_query, wire.parse_response):
        try:
            parse(data)
        except wire.WireError:
            pass


@PROPERTY
@given(st.binary(max_size=600))
def test_property_arbitrary_bytes_only_raise_wire_error(data):
    _only_wire_errors(data)


@PROPERTY
@given(st.integers(0, 3), st.integers(0, 20), st.binary(max_size=600))
def test_property_garbage_after_plausible_header_only_raises_wire_error(qd, an, body):
    _only_wire_errors(header(flags=0x8180, qd=qd, an=an) + body)


@PROPERTY
@given(answer_st(), st.data())
def test_property_mangled_messages_only_raise_wire_error(message, data):
    raw = bytearray(dnslib_message(*message) if data.draw(st.booleans()) else plain_message(*message))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] ^= 1 << data.draw(st.integers(0, 7))
    cut = data.draw(st.integers(0, len(raw)))
    _only_wire_errors(bytes(raw))
    _only_wire_errors(bytes(raw[:cut]))


@pytest.mark.parametrize(
    "cls, build",
    [
        (wire.Header, wire._header),
        (wire.Question, wire._question),
        (wire.Query, wire._query),
    ],
)
def test_fast_builders_set_every_field(cls, build):
    """The parsers' fast builders must stay in step with the dataclasses' fields."""
    values = list(range(len(dataclasses.fields(cls))))
    assert build(*values) == cls(*values)


def test_pointer_into_the_header_is_rejected() -> None:
    # A question name that is only a pointer to offset 0: the "name" would be the ID bytes.
    data = bytes.fromhex("0161 0100 0001 0000 0000 0000".replace(" ", "")) + b"\xc0\x00\x00\x01\x00\x01"
    with pytest.raises(wire.BadPointer, match="inside the header"):
        wire.parse_query(data)
