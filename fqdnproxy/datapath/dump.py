"""``fqdnproxy map dump``: the allow entries of pinned maps, as a table or JSON.

The rows come from the pins directly (``--pin-dir``) or from the running agent over its admin
socket (``--socket``, which also names each endpoint); both render the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from fqdnproxy.datapath.allowmap import AllowEntry


def _expires_in(entry: AllowEntry, now_ns: int) -> float | None:
    return None if entry.expiry_ns == 0 else round((entry.expiry_ns - now_ns) / 1e9, 1)


def rows(entries: Sequence[AllowEntry], now_ns: int,
         endpoint_name: Callable[[int], str | None] | None = None) -> list[dict[str, Any]]:
    """One JSON-able row per entry; ``expires_in`` is seconds from ``now_ns`` (negative: expired,
    not yet collected; None: static). ``endpoint_name`` adds ``namespace/name``."""
    out = []
    for e in entries:
        row: dict[str, Any] = {"endpoint": e.endpoint_id, "prefix": str(e.network),
                               "ports": [str(p) for p in e.ports],
                               "expires_in": _expires_in(e, now_ns)}
        if endpoint_name is not None:
            row["endpoint_name"] = endpoint_name(e.endpoint_id)
        out.append(row)
    return out


def render_rows(table: Sequence[dict[str, Any]], output: str = "table") -> str:
    """Rows from ``rows`` as JSON or a table."""
    if output == "json":
        return json.dumps(list(table), indent=2)
    named = any("endpoint_name" in r for r in table)
    head = f"{'ENDPOINT':>8}  " + (f"{'NAME':<24} " if named else "")
    lines = [f"{head}{'PREFIX':<40} {'PORTS':<30} EXPIRES IN"]
    for r in table:
        exp = "static" if r["expires_in"] is None else (
            "expired" if r["expires_in"] <= 0 else f"{r['expires_in']}s")
        name = f"{r.get('endpoint_name') or '-':<24} " if named else ""
        lines.append(f"{r['endpoint']:>8}  {name}{r['prefix']:<40} {','.join(r['ports']):<30} {exp}")
    return "\n".join(lines)


def render(entries: Sequence[AllowEntry], now_ns: int, output: str = "table") -> str:
    """Render entries read from the pins (see ``rows``)."""
    return render_rows(rows(entries, now_ns), output)
