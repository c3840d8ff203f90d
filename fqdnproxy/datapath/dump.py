"""``fqdnproxy map dump``: the allow entries of pinned maps, as a table or JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence

from fqdnproxy.datapath.allowmap import AllowEntry


def _expires_in(entry: AllowEntry, now_ns: int) -> float | None:
    return None if entry.expiry_ns == 0 else round((entry.expiry_ns - now_ns) / 1e9, 1)


def render(entries: Sequence[AllowEntry], now_ns: int, output: str = "table") -> str:
    """Render entries; ``expires_in`` is seconds from ``now_ns`` (negative: expired, not yet GC'd)."""
    rows = [
        {"endpoint": e.endpoint_id, "prefix": str(e.network),
         "ports": [str(p) for p in e.ports], "expires_in": _expires_in(e, now_ns)}
        for e in entries
    ]
    if output == "json":
        return json.dumps(rows, indent=2)
    lines = [f"{'ENDPOINT':>8}  {'PREFIX':<40} {'PORTS':<30} EXPIRES IN"]
    for r in rows:
        exp = "static" if r["expires_in"] is None else (
            "expired" if r["expires_in"] <= 0 else f"{r['expires_in']}s")
        lines.append(f"{r['endpoint']:>8}  {r['prefix']:<40} {','.join(r['ports']):<30} {exp}")
    return "\n".join(lines)
