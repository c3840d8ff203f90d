"""What the admin commands return: plain data built from the agent's components."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fqdnproxy.endpoints import Endpoint
from fqdnproxy.fqdn.cache import FqdnCache

NS = 1_000_000_000


def cache_list(cache: FqdnCache, endpoint_by_id: Callable[[int], Endpoint | None],
               kernel_now_ns: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (endpoint, name): TTL left, expiry, IPs and source.

    ``args`` may hold ``endpoint`` ("namespace/name") and ``name`` filters.
    """
    wall_offset = time.time() - kernel_now_ns / NS
    wanted_endpoint = args.get("endpoint")
    wanted_name = _absolute(args["name"]) if args.get("name") else None
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for entry in cache.entries():
        endpoint = endpoint_by_id(entry.endpoint_id)
        key = endpoint.key if endpoint is not None else f"(gone)/{entry.endpoint_id}"
        if wanted_endpoint and key != wanted_endpoint:
            continue
        if wanted_name and entry.name != wanted_name:
            continue
        row = rows.setdefault((entry.endpoint_id, entry.name), {
            "endpoint": key, "endpoint_id": entry.endpoint_id, "name": entry.name,
            "source": entry.source, "ips": [], "expires_ns": 0})
        row["ips"].append(entry.ip)
        row["expires_ns"] = max(row["expires_ns"], entry.expiry_ns)
    result = []
    for row in rows.values():
        expires_ns = row.pop("expires_ns")
        row["ttl"] = max(0, round((expires_ns - kernel_now_ns) / NS))
        row["expires"] = time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_ns / NS + wall_offset))
        row["ips"].sort()
        result.append(row)
    result.sort(key=lambda r: (r["endpoint"], r["name"]))
    return result


def _absolute(name: str) -> str:
    name = name.lower()
    return name if name.endswith(".") else name + "."
