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


def test_question_key_is_the_lowercased_question_section() -> None:
    data = _query("WwW.Example.COM", "AAAA")
    assert upstream.question_key(wire.parse_query(data), data) == \
        b"\x03www\x07example\x03com\x00\x00\x1c\x00\x01"


def test_random_stream_covers_the_range() -> None:
    stream = upstream.RandomStream()
    values = [stream.next16() for _ in range(20_000)]
    assert all(0 <= v <= 0xFFFF for v in values)
    assert len(set(values)) > 15_000  # 20,000 draws from 65,536: about 17,000 distinct
