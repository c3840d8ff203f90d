"""dns/upstream.py pure parts: answer acceptance and the random stream."""

from __future__ import annotations

import pytest
from dnslib import DNSRecord

from fqdnproxy.dns import upstream, wire


def _query(name: str = "api.demo.test", qtype: str = "A", qid: int = 100) -> bytes:
    record = DNSRecord.question(name, qtype)
    record.header.id = qid
    return bytes(record.pack())


def _answer(name: str = "api.demo.test", qtype: str = "A", qid: int = 100, qr: int = 1) -> bytes:
    record = DNSRecord.question(name, qtype).reply()
    record.header.id = qid
    record.header.qr = qr
    return bytes(record.pack())


KEY = upstream.question_key(wire.parse_query(_query()), _query())


@pytest.mark.parametrize("answer, reason", [
    (_answer(), None),
    (_answer("API.Demo.TEST"), None),  # names compare case-insensitively
    (_answer(qid=101), "unknown_id"),
    (_answer(qr=0), "not_response"),
    (_answer("other.demo.test"), "wrong_question"),
    (_answer(qtype="AAAA"), "wrong_question"),
    (_answer("api.demo.tes"), "unreadable"),  # shorter than the question asked
    (_answer()[:20], "unreadable"),
    (_answer()[:4] + b"\x00\x02" + _answer()[6:], "wrong_question"),  # qdcount 2
])
def test_check_answer(answer: bytes, reason: str | None) -> None:
    assert upstream.check_answer(answer, 100, KEY) == reason


def test_type_and_class_bytes_are_not_lowercased() -> None:
    """HTTPS is type 65, 0x0041: "lowercased" it would be type 97, 0x0061. An answer to type 97
    (or class 0x61) is not an answer to an HTTPS query, whatever the name's case."""
    https = _query(qtype="HTTPS")
    key = upstream.question_key(wire.parse_query(https), https)
    assert key.endswith(b"\x00\x41\x00\x01")
    assert upstream.check_answer(_answer("API.demo.test", "HTTPS"), 100, key) is None
    assert upstream.check_answer(_answer(qtype="TYPE97"), 100, key) == "wrong_question"
    other_class = bytearray(_answer(qtype="HTTPS"))
    other_class[len(other_class) - 1] = 0x61  # the question's class, last in the message
    assert upstream.check_answer(bytes(other_class), 100, key) == "wrong_question"
    chaos = bytearray(_query(qtype="HTTPS"))
    chaos[-1] = 0x41  # a query of class 0x41 wants class 0x41 back, not 0x61
    chaos_key = upstream.question_key(wire.parse_query(bytes(chaos)), bytes(chaos))
    assert upstream.check_answer(bytes(other_class), 100, chaos_key) == "wrong_question"


def test_question_key_is_the_lowercased_question_section() -> None:
    data = _query("WwW.Example.COM", "AAAA")
    assert upstream.question_key(wire.parse_query(data), data) == \
        b"\x03www\x07example\x03com\x00\x00\x1c\x00\x01"


def test_random_stream_covers_the_range() -> None:
    stream = upstream.RandomStream()
    values = [stream.next16() for _ in range(20_000)]
    assert all(0 <= v <= 0xFFFF for v in values)
    assert len(set(values)) > 15_000  # 20,000 draws from 65,536: about 17,000 distinct
