"""The admin API over a real unix socket, and ``fqdnproxy cache list`` against it."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest

from fqdnproxy import cli
from fqdnproxy.admin import client, commands
from fqdnproxy.admin.server import AdminServer
from fqdnproxy.endpoints import Endpoint
from fqdnproxy.fqdn.cache import FqdnCache

S = 1_000_000_000
NOW = 1_000 * S
WEB = Endpoint(1, "demo", "web", {"app": "web"}, ("198.51.100.10",))


def _cache() -> FqdnCache:
    cache = FqdnCache()
    cache.learn(1, "api.demo.test.", [("203.0.113.10", NOW + 300 * S), ("2001:db8::10", NOW + 60 * S)])
    cache.learn(1, "db.demo.test.", [("203.0.113.11", NOW + 30 * S)])
    cache.learn(7, "gone.test.", [("203.0.113.99", NOW + 30 * S)])
    return cache


@pytest.fixture
async def server(tmp_path: Path) -> AdminServer:
    cache = _cache()
    handlers = {
        "cache.list": lambda args: commands.cache_list(
            cache, lambda i: WEB if i == 1 else None, NOW, args),
        "boom": lambda args: 1 / 0,
    }
    srv = AdminServer(tmp_path / "run" / "admin.sock", handlers)
    await srv.start()
    yield srv
    await srv.stop()


async def test_cache_list_rows(server: AdminServer) -> None:
    rows = await asyncio.to_thread(client.call, server.path, "cache.list", {})
    assert [(r["endpoint"], r["name"], r["ttl"], r["ips"]) for r in rows] == [
        ("(gone)/7", "gone.test.", 30, ["203.0.113.99"]),
        ("demo/web", "api.demo.test.", 300, ["2001:db8::10", "203.0.113.10"]),
        ("demo/web", "db.demo.test.", 30, ["203.0.113.11"]),
    ]
    assert rows[1]["source"] == "lookup" and rows[1]["expires"].endswith("Z")


async def test_filters(server: AdminServer) -> None:
    rows = await asyncio.to_thread(client.call, server.path, "cache.list",
                                   {"endpoint": "demo/web", "name": "DB.demo.test"})
    assert [r["name"] for r in rows] == ["db.demo.test."]


async def test_errors_come_back_as_admin_errors(server: AdminServer) -> None:
    with pytest.raises(client.AdminError, match="unknown command 'nope'"):
        await asyncio.to_thread(client.call, server.path, "nope")
    with pytest.raises(client.AdminError, match="boom: division by zero"):
        await asyncio.to_thread(client.call, server.path, "boom")
    # The server survived both.
    assert await asyncio.to_thread(client.call, server.path, "cache.list")


async def test_socket_is_private(server: AdminServer) -> None:
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o600


async def test_cli_cache_list_table_and_json(server: AdminServer,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = await asyncio.to_thread(cli.main, ["cache", "list", "--socket", str(server.path)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0].split() == ["ENDPOINT", "NAME", "TTL", "EXPIRES", "SOURCE", "IPS"]
    assert "api.demo.test." in out and "300s" in out
    code = await asyncio.to_thread(cli.main, ["cache", "list", "--socket", str(server.path),
                                              "--output", "json", "--endpoint", "demo/web"])
    assert code == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_cli_without_an_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["cache", "list", "--socket", str(tmp_path / "none.sock")]) == 1
    assert "is `fqdnproxy run` running?" in capsys.readouterr().err


async def test_a_live_socket_is_not_taken_over(server: AdminServer) -> None:
    second = AdminServer(server.path, {})
    with pytest.raises(OSError, match="another agent is running"):
        await second.start()
    assert await asyncio.to_thread(client.call, server.path, "cache.list")


async def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    import socket as socket_mod

    path = tmp_path / "admin.sock"
    stale = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed agent leaves
    server = AdminServer(path, {"ping": lambda args: "pong"})
    await server.start()
    try:
        assert await asyncio.to_thread(client.call, path, "ping") == "pong"
    finally:
        await server.stop()
