"""What the admin commands return: plain data built from the agent's components.

``handlers(agent)`` is what the agent serves on its admin socket; each command is a function of
explicit components, so tests call them without an agent. Commands that walk BPF maps run in a
thread; the rest run on the loop (the cache is the loop's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fqdnproxy.admin import client
from fqdnproxy.datapath import dump, pinned
from fqdnproxy.datapath.allowmap import kernel_now_ns
from fqdnproxy.endpoints import Endpoint
from fqdnproxy.errors import FqdnproxyError
from fqdnproxy.fqdn.cache import RESTORED, FqdnCache
from fqdnproxy.observe import datapath_metrics

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


# --- the other commands (status, endpoint list, policy list, map dump, cache clean) -----------


class AdminCommandError(FqdnproxyError):
    """An admin command's arguments do not name anything the agent has."""


@dataclass(frozen=True)
class ReloadRecord:
    """The last policy load or reload that changed something, for ``fqdnproxy status``."""

    time: float  # seconds since the epoch
    result: str  # loaded, reloaded, rejected
    version: int  # the policy version serving after it
    errors: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"time": _utc(self.time), "result": self.result, "version": self.version,
                "errors": list(self.errors)}


class AgentView(Protocol):
    """What the commands read from the agent (``agent.Agent`` has all of it)."""

    config: Any  # config.AgentConfig
    store: Any  # policy.reload.PolicyStore, or None without policies
    cache: FqdnCache | None
    learner: Any  # fqdn.learner.AllowLearner, or None
    datapath: Any  # datapath.egress.EgressDatapath, or None
    readiness: Any  # observe.http.Readiness
    started: float
    last_reload: ReloadRecord | None


def handlers(agent: AgentView, workers: Sequence[Path] = ()
             ) -> dict[str, Callable[[dict[str, Any]], Any]]:
    """The admin API's commands, by name, over ``agent``'s components.

    ``workers``: the admin sockets of the other DNS workers (workers.py), given to worker 0.
    Each worker has its own cache and exact allow map, so ``cache list`` and ``cache clean``
    ask every worker and merge what they say, and ``map dump`` reads every worker's map: an
    operator's clean must reach every map that lets the endpoint out. A worker that does not
    answer (restarting) fails the command, rather than leave its part silently out.
    """

    async def ask_workers(command: str, args: dict[str, Any]) -> list[Any]:
        results = []
        for path in workers:
            try:
                results.append(await asyncio.to_thread(client.call, path, command, args))
            except client.AdminError as error:
                raise AdminCommandError(f"DNS worker at {path}: {error}") from None
        return results

    def registry() -> Any:
        return agent.store.current.registry if agent.store is not None else None

    async def status(args: dict[str, Any]) -> dict[str, Any]:
        map_entries = None
        if agent.datapath is not None:
            map_entries = await asyncio.to_thread(
                datapath_metrics.count_allow_entries, agent.datapath.maps)
        return status_of(agent, time.time(), map_entries)

    async def endpoint_list_(args: dict[str, Any]) -> list[dict[str, Any]]:
        counters = (await asyncio.to_thread(agent.datapath.counters)
                    if agent.datapath is not None else None)
        return endpoint_list(agent.store.current if agent.store is not None else None,
                             agent.cache, agent.config.policy.audit_mode, counters)

    async def map_dump_(args: dict[str, Any]) -> list[dict[str, Any]]:
        if agent.datapath is None:
            raise AdminCommandError("the datapath is not enabled (datapath.enabled)")
        if workers:
            entries = await asyncio.to_thread(pinned.dump_every_worker, agent.datapath.maps.pin_dir)
        else:
            entries = await asyncio.to_thread(agent.datapath.dump)
        current = registry()

        def name(endpoint_id: int) -> str | None:
            endpoint = current.by_id(endpoint_id) if current is not None else None
            return endpoint.key if endpoint is not None else None

        return dump.rows(entries, kernel_now_ns(), name)

    async def cache_list_(args: dict[str, Any]) -> list[dict[str, Any]]:
        if agent.cache is None:
            return []
        current = registry()
        own = cache_list(agent.cache, current.by_id if current is not None else lambda i: None,
                         kernel_now_ns(), args)
        return merge_cache_rows([own, *await ask_workers("cache.list", args)])

    async def cache_clean_(args: dict[str, Any]) -> dict[str, int]:
        if agent.cache is None or agent.store is None:
            raise AdminCommandError("no cache: the agent runs without policies")
        current = agent.store.current
        own = cache_clean(agent.cache, agent.learner, current.registry,
                          lambda i: current.engine.for_id(i), args)
        for other in await ask_workers("cache.clean", args):
            for key, count in other.items():
                own[key] = own.get(key, 0) + count
        return own

    return {
        "status": status,
        "endpoint.list": endpoint_list_,
        "policy.list": lambda args: policy_list(
            agent.store.current if agent.store is not None else None),
        "map.dump": map_dump_,
        "cache.list": cache_list_,
        "cache.clean": cache_clean_,
    }


def merge_cache_rows(row_lists: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``cache_list`` rows of several DNS workers as one list: one row per (endpoint, name),
    its IPs the union, its TTL and expiry the latest, its source a lookup's over "restored" if
    any worker learned it by name."""
    merged: dict[tuple[int, str], dict[str, Any]] = {}
    for rows in row_lists:
        for row in rows:
            key = (row["endpoint_id"], row["name"])
            seen = merged.get(key)
            if seen is None:
                merged[key] = {**row, "ips": list(row["ips"])}
                continue
            seen["ips"] = sorted(set(seen["ips"]) | set(row["ips"]))
            if row["ttl"] > seen["ttl"]:
                seen["ttl"], seen["expires"] = row["ttl"], row["expires"]
            if seen["source"] == RESTORED:
                seen["source"] = row["source"]
    return sorted(merged.values(), key=lambda r: (r["endpoint"], r["name"]))


def status_of(agent: AgentView, now: float, map_entries: dict[str, int] | None) -> dict[str, Any]:
    """``fqdnproxy status``: uptime, readiness, endpoints, policies, cache and map sizes, reload."""
    from fqdnproxy import __version__
    from fqdnproxy.policy import audit_mode

    cfg = agent.config
    current = agent.store.current if agent.store is not None else None
    endpoints = {"workloads": 0, "services": 0, "enforced": 0, "audit": 0}
    policies = None
    if current is not None:
        for endpoint in current.registry:
            endpoints["services" if endpoint.kind == "service" else "workloads"] += 1
        for policy in current.engine:
            if policy.enforced:
                endpoints["enforced"] += 1
                if audit_mode.audited(policy.endpoint, cfg.policy.audit_mode):
                    endpoints["audit"] += 1
        policies = {"loaded": len(current.policy_set.policies),
                    "files": len(current.policy_set.files), "version": current.version,
                    "warnings": len(current.policy_set.warnings)}
    return {
        "version": __version__,
        "started": _utc(agent.started),
        "uptime_s": round(now - agent.started, 1),
        "ready": agent.readiness.ready,
        "readiness": agent.readiness.describe(),
        "audit_mode": cfg.policy.audit_mode,
        "endpoints": endpoints if current is not None else None,
        "policies": policies,
        "cache": ({"entries": len(agent.cache), "names": agent.cache.name_count()}
                  if agent.cache is not None else None),
        "datapath": ({"pin_dir": cfg.datapath.pin_dir, "allow_entries": map_entries}
                     if agent.datapath is not None else None),
        "last_reload": agent.last_reload.to_json() if agent.last_reload is not None else None,
    }


def endpoint_list(current: Any, cache: FqdnCache | None, audit_globally: bool,
                  counters: dict[int, dict[Any, int]] | None) -> list[dict[str, Any]]:
    """One row per inventory endpoint: addresses, mode, selecting policies, cached names and,
    with the datapath, its packets passed and dropped."""
    from fqdnproxy.observe import datapath_metrics
    from fqdnproxy.policy import audit_mode

    if current is None:
        return []
    rows = []
    for endpoint in current.registry:
        row: dict[str, Any] = {"endpoint": endpoint.key, "id": endpoint.id, "kind": endpoint.kind,
                               "ips": list(endpoint.ips), "interface": endpoint.interface,
                               "mode": "service", "policies": [], "names": 0}
        if endpoint.kind == "workload":
            policy = current.engine.for_endpoint(endpoint)
            row["policies"] = list(policy.policies)
            row["mode"] = ("unenforced" if not policy.enforced else
                           "audit" if audit_mode.audited(endpoint, audit_globally) else "enforce")
            row["names"] = len(cache.names(endpoint.id)) if cache is not None else 0
        if counters is not None:
            totals = {"pass": 0, "drop": 0, "audit": 0}
            for reason, count in counters.get(endpoint.id, {}).items():
                if reason.name != "EVENT_SUPPRESSED":
                    totals[datapath_metrics.verdict(reason)] += count
            row["packets"] = totals
        rows.append(row)
    rows.sort(key=lambda r: r["endpoint"])
    return rows


def policy_list(current: Any) -> list[dict[str, Any]]:
    """One row per loaded policy: kind, file and document, and the endpoints it selects."""
    if current is None:
        return []
    selected: dict[str, list[str]] = {}
    for policy in current.engine:
        for label in policy.policies:
            selected.setdefault(label, []).append(policy.endpoint.key)
    rows = [{"policy": p.label, "kind": p.kind, "file": p.file, "document": p.document,
             "egress": p.has_egress_section, "endpoints": sorted(selected.get(p.label, []))}
            for p in current.policy_set.policies]
    rows.sort(key=lambda r: (r["file"], r["document"]))
    return rows


def cache_clean(cache: FqdnCache, learner: Any, registry: Any,
                policy_for: Callable[[int], Any], args: dict[str, Any]) -> dict[str, int]:
    """Forget what an endpoint (``endpoint``: namespace/name or id), a name (``name``), or one
    name of one endpoint taught, and fix the allow map at once: entries of IPs nothing holds any
    more are deleted, IPs other names still hold are rewritten with what is left.

    Raises:
        AdminCommandError: neither filter given, or an unknown endpoint.
    """
    wanted = args.get("endpoint")
    name = _absolute(args["name"]) if args.get("name") else None
    if not wanted and not name:
        raise AdminCommandError("cache clean needs an endpoint, a name, or both")
    ids = [_endpoint_id(wanted, registry, cache)] if wanted else cache.endpoint_ids()
    result = {"endpoints": 0, "names": 0, "ips": 0, "map_rewritten": 0, "map_deleted": 0}
    for endpoint_id in ids:
        if name:
            if name not in cache.names(endpoint_id):
                continue
            names = 1
            ips = cache.remove_name(endpoint_id, name)
        else:
            names = len(cache.names(endpoint_id))
            ips = cache.remove_endpoint(endpoint_id)
        result["endpoints"] += 1
        result["names"] += names
        result["ips"] += len(ips)
        if learner is None or not ips:
            continue
        policy = policy_for(endpoint_id)
        if policy is None or not policy.enforced:
            result["map_deleted"] += learner.delete(endpoint_id, ips)
        else:
            written = learner.sync(policy, endpoint_id, ips)
            result["map_rewritten"] += len(written)
            result["map_deleted"] += len(ips) - len(written)
    return result


def _endpoint_id(wanted: Any, registry: Any, cache: FqdnCache) -> int:
    text = str(wanted)
    if text.isdigit():
        return int(text)
    if text.startswith("(gone)/") and text[len("(gone)/"):].isdigit():
        return int(text[len("(gone)/"):])  # as cache list names an endpoint no longer listed
    namespace, _, name = text.partition("/")
    endpoint = registry.by_name(namespace, name) if name else None
    if endpoint is None:
        raise AdminCommandError(f"no endpoint {text!r} in the inventory (namespace/name or id)")
    return int(endpoint.id)


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
