"""The lab's real upstream: knotd serving the demo zone on loopback, queried over UDP and TCP."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import dnslib
import pytest

from fqdnproxy.lab import knot
from tests.conftest import require


def _knotd_present() -> bool:
    return os.path.exists(knot.KnotServer(listen=[("127.0.0.1", 53)]).knotd)


@pytest.fixture(scope="module")
def server() -> Iterator[knot.KnotServer]:
    # Under CI=true a missing knotd fails: the bootstrap installs it.
    require(_knotd_present(), "knotd not installed (apt package knot; run `make bootstrap`)")
    require(socket.has_ipv6 and _ipv6_loopback(), "needs ::1")
    port = knot.free_port()
    with knot.KnotServer(listen=[("127.0.0.1", port), ("::1", port)], workers=2) as srv:
        yield srv


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def _ask(server: knot.KnotServer, name: str, qtype: str, *, host: str, tcp: bool) -> dnslib.DNSRecord:
    port = server.listen[0][1]
    query = dnslib.DNSRecord.question(name, qtype)
    reply = dnslib.DNSRecord.parse(query.send(host, port, tcp=tcp, timeout=2, ipv6=":" in host))
    assert reply.header.id == query.header.id
    return reply


def _data(reply: dnslib.DNSRecord, qtype: str) -> list[str]:
    rrs = [rr for rr in reply.rr if rr.rtype == getattr(dnslib.QTYPE, qtype)]
    if qtype == "TXT":  # the character-strings, one TXT record per "a|b" entry
        return sorted("|".join(part.decode() for part in rr.rdata.data) for rr in rrs)
    return sorted(str(rr.rdata) for rr in rrs)


TRANSPORTS = [
    pytest.param("127.0.0.1", False, id="udp4"),
    pytest.param("127.0.0.1", True, id="tcp4"),
    pytest.param("::1", False, id="udp6"),
    pytest.param("::1", True, id="tcp6"),
]

# name, qtype, expected data of that type in the answer section
CASES = [
    ("api.demo.test", "A", ["203.0.113.10"]),
    ("api.demo.test", "AAAA", ["2001:db8::10"]),
    ("v6only.demo.test", "AAAA", ["2001:db8::20"]),
    ("short.demo.test", "A", ["203.0.113.20"]),
    ("blocked.demo.test", "A", ["203.0.113.66"]),
    ("many.demo.test", "A", sorted(f"203.0.113.{100 + i}" for i in range(20))),
    ("txt.demo.test", "TXT", ["fqdnproxy demo zone|v=1"]),
]


@pytest.mark.parametrize(("host", "tcp"), TRANSPORTS)
@pytest.mark.parametrize(("name", "qtype", "expected"), CASES)
def test_answers(server, host, tcp, name, qtype, expected) -> None:
    reply = _ask(server, name, qtype, host=host, tcp=tcp)
    assert reply.header.rcode == dnslib.RCODE.NOERROR
    assert reply.header.aa
    assert _data(reply, qtype) == expected


@pytest.mark.parametrize(("host", "tcp"), TRANSPORTS)
def test_cname_chain(server, host, tcp) -> None:
    reply = _ask(server, "www.demo.test", "A", host=host, tcp=tcp)
    chain = [(str(rr.rname), str(rr.rdata), rr.ttl) for rr in reply.rr if rr.rtype == dnslib.QTYPE.CNAME]
    assert chain == [("www.demo.test.", "web.demo.test.", 120), ("web.demo.test.", "api.demo.test.", 60)]
    assert _data(reply, "A") == ["203.0.113.10"]


def test_cname_query_returns_only_the_first_link(server) -> None:
    reply = _ask(server, "www.demo.test", "CNAME", host="127.0.0.1", tcp=False)
    assert [(str(rr.rname), str(rr.rdata)) for rr in reply.rr] == [("www.demo.test.", "web.demo.test.")]


def test_short_ttl_and_nxdomain(server) -> None:
    short = _ask(server, "short.demo.test", "A", host="127.0.0.1", tcp=False)
    assert [rr.ttl for rr in short.rr] == [2]
    missing = _ask(server, "nope.demo.test", "A", host="127.0.0.1", tcp=False)
    assert missing.header.rcode == dnslib.RCODE.NXDOMAIN
    assert any(rr.rtype == dnslib.QTYPE.SOA for rr in missing.auth)


def test_everything_stays_in_the_rundir(server) -> None:
    config = server.config_path.read_text()
    rundir = str(server.config_path.parent)
    assert "/var/lib/knot" not in config and "/run/knot" not in config
    for key in ("rundir:", "pidfile:", "storage:"):
        assert all(rundir in line for line in config.splitlines() if line.strip().startswith(key))
    assert server.pid is not None


def test_stop_removes_temporary_rundir() -> None:
    require(_knotd_present(), "knotd not installed (apt package knot; run `make bootstrap`)")
    srv = knot.KnotServer(listen=[("127.0.0.1", knot.free_port(("127.0.0.1",)))])
    with srv:
        rundir = srv.config_path.parent
        pid = srv.pid
        assert pid is not None and rundir.is_dir()
    assert not rundir.exists()
    assert srv.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_broken_zone_fails_with_knot_log(tmp_path: Path) -> None:
    require(_knotd_present(), "knotd not installed (apt package knot; run `make bootstrap`)")
    bad = tmp_path / "bad.test.zone"
    bad.write_text("$ORIGIN bad.test.\n@ 60 IN A not-an-address\n")
    srv = knot.KnotServer(
        listen=[("127.0.0.1", knot.free_port(("127.0.0.1",)))],
        zones=[bad],
        rundir=tmp_path / "run",
        start_timeout=2,
    )
    with pytest.raises(knot.KnotError, match="bad.test") as info:
        srv.start()
    assert "knotd" in str(info.value)
    assert srv.pid is None
    assert (tmp_path / "run" / "knotd.log").exists()  # a given rundir is kept for inspection


def test_missing_knotd_is_a_clear_error() -> None:
    srv = knot.KnotServer(listen=[("127.0.0.1", 1)], knotd="/nonexistent/knotd")
    with pytest.raises(knot.KnotError, match="make bootstrap"):
        srv.start()


def test_zone_names_come_from_file_names() -> None:
    srv = knot.KnotServer(listen=[("127.0.0.1", 1)], zones=[knot.DEMO_ZONE, Path("x/example.org.zone")])
    assert srv.zone_names == ["demo.test.", "example.org."]


@pytest.mark.root
def test_knot_in_a_namespace() -> None:
    from tests.support import netns

    require(_knotd_present(), "knotd not installed (apt package knot; run `make bootstrap`)")
    with netns.namespace() as ns:
        # Port 53 inside a fresh namespace: nothing else can hold it there.
        with knot.KnotServer(listen=[("127.0.0.1", 53)], netns=ns) as srv:
            assert srv.pid is not None
            out = netns.run(ns, "kdig", "+short", "@127.0.0.1", "api.demo.test", "A").stdout
            assert out.split() == ["203.0.113.10"]
        # And not in the root namespace.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.3)
            sock.sendto(dnslib.DNSRecord.question("demo.test", "SOA").pack(), ("127.0.0.1", 53))
            with pytest.raises(OSError):
                sock.recv(512)
