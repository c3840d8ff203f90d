"""The audit log's fast paths write exactly what the plain ones did.

``reference_line`` is the rendering the log used before ``AuditRenderer`` (``to_dict``, then
orjson), kept here verbatim so a change to either side shows up as a byte difference.
"""

from __future__ import annotations

import gc
import inspect
import time
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fqdnproxy.dns import wire
from fqdnproxy.exchange import AllowedIp
from fqdnproxy.observe import audit
from fqdnproxy.observe.metrics import Metrics

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _rfc3339(timestamp: float) -> str:
    second = int(timestamp)
    date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{date}.{int((timestamp - second) * 1_000_000):06d}Z"


def reference_to_dict(self: audit.AuditRecord) -> dict[str, Any]:
    """``AuditRecord.to_dict`` as it was before the renderer."""
    return {
        "time": _rfc3339(self.time),
        "type": self.type,
        "endpoint": self.endpoint,
        "source": {"ip": self.source[0], "port": self.source[1]},
        "server": {"ip": self.server[0], "port": self.server[1]} if self.server else None,
        "protocol": self.protocol,
        "query": {"name": self.query_name, "type": self.query_type,
                  "class": self.query_class, "id": self.query_id},
        "verdict": self.verdict,
        "reason": self.reason,
        "rcode": self.rcode,
        "answers": [
            {"name": a.name, "type": wire.qtype_name(a.rtype), "ttl": a.ttl, "data": a.data}
            for a in self.answers
        ],
        "cnames": list(self.cnames),
        "allowed": [{"ip": a.ip, "expires": _rfc3339(a.expires), "ports": a.ports}
                    for a in self.allowed_ips],
        "latency_ms": round(self.latency * 1000.0, 3),
    }


def reference_line(record: audit.AuditRecord) -> bytes:
    return orjson.dumps(reference_to_dict(record), option=orjson.OPT_APPEND_NEWLINE)


# --- generated records -------------------------------------------------------------------------

# Any text: unicode, quotes, backslashes, control characters (orjson escapes; the memo must not).
texts = st.text(max_size=40)
names = st.one_of(st.sampled_from(["www.example.com", "bücher.example.de", "例え.jp", 'a"b\\c.\n']),
                  texts)
# 1970 to 2106, fractions included; the same second recurs through the sampled ones.
times = st.one_of(st.floats(0, 2**32, allow_nan=False),
                  st.sampled_from([1.7e9, 1.7e9 + 0.999999, 1.7e9 + 60.5, 1.7e9 + 300.000001]))
u16 = st.integers(0, 0xFFFF)
records = st.builds(wire.Record, names, st.one_of(st.sampled_from([1, 5, 28]), u16),
                    st.integers(0, 2**31 - 1), texts)
allowed_ips = st.builds(AllowedIp, texts, times, st.sampled_from(["tcp/443", "any", "udp/53"]))
endpoints = st.one_of(st.none(), st.fixed_dictionaries({
    "id": st.integers(0, 2**32 - 1), "namespace": texts, "name": texts,
    "labels": st.dictionaries(texts, texts, max_size=3)}))
addresses = st.tuples(st.sampled_from(["10.0.0.1", "2001:db8::1", "::ffff:1.2.3.4"]), u16)


@st.composite
def audit_records(draw: Any, answer_pool: list[tuple[wire.Record, ...]]) -> audit.AuditRecord:
    """A record whose answers are one of ``answer_pool``'s tuples (the same objects, as the
    parse cache hands them out) or a fresh one."""
    if answer_pool and draw(st.booleans()):
        answers = draw(st.sampled_from(answer_pool))
    else:
        answers = tuple(draw(st.lists(records, max_size=4)))
    return audit.AuditRecord(
        time=draw(times), type=draw(st.sampled_from(["answer", "query"])),
        protocol=draw(st.sampled_from(["udp", "tcp"])), source=draw(addresses),
        server=draw(st.one_of(st.none(), addresses)), query_name=draw(names),
        query_type=draw(st.sampled_from(["A", "AAAA", "TYPE65"])), query_class=draw(u16),
        query_id=draw(u16), verdict=draw(st.sampled_from(["allowed", "denied", "audit"])),
        reason=draw(texts), rcode=draw(st.sampled_from([None, "NOERROR", "NXDOMAIN"])),
        latency=draw(st.floats(0, 30, allow_nan=False)), answers=answers,
        cnames=tuple(draw(st.lists(names, max_size=3))), endpoint=draw(endpoints),
        allowed_ips=tuple(draw(st.lists(allowed_ips, max_size=4))))


@st.composite
def record_streams(draw: Any) -> list[audit.AuditRecord]:
    """Records sharing answer tuples, some of them repeated outright."""
    pool = [tuple(draw(st.lists(records, min_size=1, max_size=4))) for _ in range(3)]
    stream = draw(st.lists(audit_records(pool), min_size=1, max_size=12))
    return stream + draw(st.lists(st.sampled_from(stream), max_size=6))


@PROPERTY
@given(record_streams(), st.sampled_from([0, 1, 2, 4096]))
def test_renderer_writes_the_reference_bytes(stream: list[audit.AuditRecord], size: int) -> None:
    # Tiny memos evict all the time; 0 remembers nothing; 4096 hits on every repeat.
    renderer = audit.AuditRenderer(answers_size=size, dates_size=size, endpoints_size=size)
    for record in stream:
        assert renderer.render(record) == reference_line(record)


@PROPERTY
@given(audit_records([]))
def test_to_dict_is_unchanged(record: audit.AuditRecord) -> None:
    assert orjson.dumps(record.to_dict()) == orjson.dumps(reference_to_dict(record))


def test_typical_records_hit_the_memos() -> None:
    renderer = audit.AuditRenderer()
    answers = (wire.Record("bücher.example", 5, 300, "edge.cdn.example"),
               wire.Record("edge.cdn.example", 1, 60, "192.0.2.1"),
               wire.Record("edge.cdn.example", 28, 60, "2001:db8::1"))
    endpoint = {"id": 7, "namespace": "shop", "name": "web", "labels": {"app": "web"}}
    for i in range(3):
        now = 1_700_000_000.25 + i
        record = audit.AuditRecord(
            time=now, type="answer", protocol="udp", source=("10.0.0.7", 40000 + i),
            server=("10.96.0.10", 53), query_name="bücher.example", query_type="A",
            query_class=1, query_id=i, verdict="allowed", reason="shop/web", rcode="NOERROR",
            latency=0.0012, answers=answers, cnames=("edge.cdn.example",), endpoint=endpoint,
            allowed_ips=(AllowedIp("192.0.2.1", now + 60, "tcp/443"),
                         AllowedIp("2001:db8::1", now + 60, "tcp/443")))
        assert renderer.render(record) == reference_line(record)
    memos = renderer.memos()
    assert (memos["answers"].stats.misses, memos["answers"].stats.hits) == (1, 2)
    assert (memos["endpoints"].stats.misses, memos["endpoints"].stats.hits) == (1, 2)
    assert len(memos["dates"]) == 6  # three seconds now, three a TTL on


def test_empty_answers_and_no_server_or_endpoint() -> None:
    record = audit.AuditRecord(
        time=0.0, type="query", protocol="tcp", source=("::1", 0), server=None,
        query_name="", query_type="TYPE0", query_class=0, query_id=0, verdict="denied",
        reason="no-rule", rcode=None, latency=0.0)
    line = audit.AuditRenderer().render(record)
    assert line == reference_line(record)
    assert b'"server":null' in line and b'"answers":[],"cnames":[],"allowed":[]' in line


def test_a_tuple_at_a_reused_address_is_not_mistaken_for_the_old_one() -> None:
    # Capacity 1: rendering a second answer evicts the first, which then dies; a new tuple may
    # be allocated at its address. The memo must render the new one, not remember the old.
    renderer = audit.AuditRenderer(answers_size=1)

    def answer_of(data: str) -> audit.AuditRecord:
        answers = (wire.Record("a.example", 1, 60, data),)  # a new tuple each call
        return audit.AuditRecord(
            time=1.0, type="answer", protocol="udp", source=("10.0.0.1", 1), server=None,
            query_name="a.example", query_type="A", query_class=1, query_id=1,
            verdict="allowed", reason="r", rcode="NOERROR", latency=0.0, answers=answers)

    for i in range(200):
        first = answer_of(f"192.0.2.{i % 250}")
        assert renderer.render(first) == reference_line(first)
        del first
        second = answer_of(f"198.51.100.{i % 250}")
        assert renderer.render(second) == reference_line(second)
        del second
        gc.collect()


def test_answers_in_a_list_are_rendered_not_remembered() -> None:
    answers: Any = [wire.Record("a.example", 1, 60, "192.0.2.1")]
    record = audit.AuditRecord(
        time=1.0, type="answer", protocol="udp", source=("10.0.0.1", 1), server=None,
        query_name="a.example", query_type="A", query_class=1, query_id=1, verdict="allowed",
        reason="r", rcode="NOERROR", latency=0.0, answers=answers)
    renderer = audit.AuditRenderer()
    assert renderer.render(record) == reference_line(record)
    answers.append(wire.Record("a.example", 1, 60, "192.0.2.2"))
    assert renderer.render(record) == reference_line(record)
    assert len(renderer.memos()["answers"]) == 0


# --- the fast constructor ----------------------------------------------------------------------


def test_fast_takes_every_field_with_the_same_defaults() -> None:
    parameters = inspect.signature(audit.AuditRecord.fast).parameters
    assert list(parameters) == list(audit.AuditRecord._fields)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values())
    defaults = audit.AuditRecord._field_defaults
    assert {name: p.default for name, p in parameters.items()} == {
        name: defaults.get(name, inspect.Parameter.empty) for name in audit.AuditRecord._fields}


@PROPERTY
@given(audit_records([]), st.binary(max_size=8), st.one_of(st.none(), st.binary(max_size=8)))
def test_fast_builds_the_record_the_constructor_builds(
        record: audit.AuditRecord, query: bytes, response: bytes | None) -> None:
    values = record._asdict()
    values.update(query_message=query, response_message=response)
    fast = audit.AuditRecord.fast(**values)
    assert type(fast) is audit.AuditRecord
    assert fast == audit.AuditRecord(**values)
    assert {name: getattr(fast, name) for name in values} == values


def test_fast_keeps_the_record_frozen() -> None:
    record = audit.AuditRecord.fast(
        time=1.0, type="query", protocol="udp", source=("10.0.0.1", 1), server=None,
        query_name="a.example", query_type="A", query_class=1, query_id=1, verdict="denied",
        reason="r", rcode="REFUSED", latency=0.0)
    try:
        record.verdict = "allowed"  # type: ignore[misc]
    except AttributeError:
        pass
    else:
        raise AssertionError("an AuditRecord built by fast() is writable")
    assert record.answers == () and record.endpoint is None and record.response_message is None


# --- the sink ----------------------------------------------------------------------------------


def test_the_log_writes_reference_lines_and_exports_its_memos(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    metrics = Metrics()
    log = audit.JsonLinesAuditLog(str(path), 100, metrics)
    answers = (wire.Record("a.example", 1, 60, "192.0.2.1"),)
    records: list[Any] = [audit.AuditRecord(
        time=1_700_000_000.5 + i, type="answer", protocol="udp", source=("10.0.0.1", 1000 + i),
        server=("10.96.0.10", 53), query_name="a.example", query_type="A", query_class=1,
        query_id=i, verdict="allowed", reason="r", rcode="NOERROR", latency=0.001,
        answers=answers, allowed_ips=(AllowedIp("192.0.2.1", 1_700_000_060.5 + i, "any"),))
        for i in range(3)]
    drop = audit.DropRecord(1_700_000_001.0, None, 9, ("10.0.0.1", 5), ("192.0.2.9", 443),
                            "tcp", "no_entry", "dropped")
    records.insert(1, drop)
    for record in records:
        log.emit(record)
    log.close()
    expected = b"".join(
        orjson.dumps(r.to_dict(), option=orjson.OPT_APPEND_NEWLINE) if r is drop
        else reference_line(r) for r in records)
    assert path.read_bytes() == expected
    value = metrics.registry.get_sample_value
    assert value("fqdnproxy_audit_memo_lookups_total", {"memo": "answers", "result": "hit"}) == 2
    assert value("fqdnproxy_audit_memo_entries", {"memo": "answers"}) == 1
    assert value("fqdnproxy_audit_memo_evictions_total", {"memo": "dates"}) == 0
