"""Plain-text tables for the admin commands' default output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell, a rule under the header; ``(none)`` when empty."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if not rows:
        lines.append("(none)")
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    """``key: value`` lines, the keys padded to one column."""
    width = max((len(key) for key, _ in pairs), default=0)
    return "\n".join(f"{key + ':':<{width + 1}} {value}" for key, value in pairs)


def status(s: dict[str, Any]) -> str:
    """``fqdnproxy status`` as text."""
    waiting = [name for name, held in s["readiness"].items() if not held]
    pairs: list[tuple[str, object]] = [
        ("version", s["version"]),
        ("started", f"{s['started']} (up {_duration(s['uptime_s'])})"),
        ("ready", "yes" if s["ready"] else f"no (waiting for {', '.join(waiting)})"),
        ("audit mode", "every endpoint" if s["audit_mode"] else "per endpoint (label)"),
    ]
    e = s["endpoints"]
    pairs.append(("endpoints", "none (no policies)" if e is None else
                  f"{e['workloads']} workloads ({e['enforced']} enforced, {e['audit']} in audit "
                  f"mode), {e['services']} services"))
    p = s["policies"]
    pairs.append(("policies", "none" if p is None else
                  f"{p['loaded']} from {p['files']} files, version {p['version']}, "
                  f"{p['warnings']} warnings"))
    c = s["cache"]
    pairs.append(("cache", "off" if c is None else f"{c['entries']} entries, {c['names']} names"))
    d = s["datapath"]
    if d is None:
        pairs.append(("datapath", "off"))
    else:
        entries = d["allow_entries"] or {}
        pairs.append(("datapath", f"pinned at {d['pin_dir']}"))
        pairs.append(("allow map", f"{entries.get('exact', 0)} exact, {entries.get('prefix', 0)} "
                                   "prefix entries"))
    r = s["last_reload"]
    pairs.append(("last reload", "never" if r is None else
                  f"{r['result']} at {r['time']} (version {r['version']})"))
    if r is not None:
        pairs += [("  error", error) for error in r["errors"]]
    return fields(pairs)


def endpoints(rows: Sequence[dict[str, Any]]) -> str:
    """``fqdnproxy endpoint list`` as a table."""
    with_packets = any("packets" in r for r in rows)
    headers = ["ENDPOINT", "ID", "KIND", "MODE", "IPS", "INTERFACE", "POLICIES", "NAMES"]
    if with_packets:
        headers += ["PASSED", "DROPPED", "AUDITED"]
    out = []
    for r in rows:
        row: list[object] = [r["endpoint"], r["id"], r["kind"], r["mode"], ",".join(r["ips"]),
                             r["interface"] or "-", ",".join(r["policies"]) or "-", r["names"]]
        if with_packets:
            packets = r.get("packets") or {}
            row += [packets.get("pass", 0), packets.get("drop", 0), packets.get("audit", 0)]
        out.append(row)
    return table(headers, out)


def policies(rows: Sequence[dict[str, Any]]) -> str:
    """``fqdnproxy policy list`` as a table."""
    return table(("POLICY", "KIND", "FILE", "DOC", "ENDPOINTS"),
                 [(r["policy"], r["kind"], r["file"], r["document"],
                   ",".join(r["endpoints"]) or "-") for r in rows])


def cache_clean(result: dict[str, int]) -> str:
    """``fqdnproxy cache clean`` as one sentence."""
    return (f"removed {result['names']} names ({result['ips']} IPs) of {result['endpoints']} "
            f"endpoints; allow map: {result['map_deleted']} entries deleted, "
            f"{result['map_rewritten']} rewritten")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h{minutes}m"
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
