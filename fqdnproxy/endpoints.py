"""The endpoint registry: which workload (pod, container, LAN client) owns a source IP.

An inventory file lists endpoints; DNS services that policies name with ``toEndpoints`` (for
example kube-dns) are listed too, with ``kind: service``, so that a selector such as
``k8s:k8s-app: kube-dns`` in ``kube-system`` matches the DNS server's address::

    endpoints:
      - namespace: demo
        name: frontend
        labels: {app: frontend}
        ips: [198.51.100.10, 2001:db8:100::10]
        interface: fqp-frontend-h     # host-side interface; optional (LAN clients)
        id: 10                        # optional; derived from namespace/name when absent
      - namespace: kube-system
        name: kube-dns
        kind: service                 # a peer only: never a source the datapath enforces
        labels: {k8s-app: kube-dns}
        ips: [198.51.100.53]

Labels are Kubernetes labels (source ``k8s``) unless the key names another source
(``container:`` or ``unspec:``). Every endpoint also carries Cilium's namespace label
``k8s:io.kubernetes.pod.namespace`` derived from ``namespace``; it may not be written by hand.
"""

from __future__ import annotations

import ipaddress
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

import yaml

from fqdnproxy.errors import FqdnproxyError
from fqdnproxy.policy import model

Kind = Literal["workload", "service"]
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
LABEL_SOURCES = ("k8s", "container", "unspec")
MAX_ID = 2**32 - 1
_DERIVED_ID_BASE = 1 << 16  # derived ids live in [65536, 2**31); pick explicit ids below 65536
_ENTRY_KEYS = ("namespace", "name", "labels", "ips", "interface", "id", "kind")
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_IFNAME_RE = re.compile(r"[^\s/:]{1,15}")


class EndpointsError(FqdnproxyError):
    """The endpoint inventory is invalid."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One workload (or DNS service) with its addresses; ``labels`` as written in the inventory."""

    id: int
    namespace: str
    name: str
    labels: Mapping[str, str] = field(hash=False)
    ips: tuple[str, ...]
    interface: str | None = None
    kind: Kind = "workload"
    # How audit records name the endpoint: id, namespace, name, labels. Made once, here: every
    # audit record of the endpoint carries this one dict, and the audit renderer remembers its
    # JSON by the dict's id. Never mutated.
    identity: dict[str, Any] = field(init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "identity", {"id": self.id, "namespace": self.namespace,
                                              "name": self.name, "labels": dict(self.labels)})

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selector_labels(self) -> dict[tuple[str, str], str]:
        """Labels keyed by (source, key) as selectors see them, the namespace label included."""
        result = {}
        for key, value in self.labels.items():
            source, _, bare = key.partition(":") if ":" in key else (model.DEFAULT_SOURCE, "", key)
            result[(source, bare)] = value
        result[(model.DEFAULT_SOURCE, model.NAMESPACE_LABEL)] = self.namespace
        return result

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "namespace": self.namespace,
            "name": self.name,
            "labels": dict(self.labels),
            "ips": list(self.ips),
            "interface": self.interface,
            "kind": self.kind,
        }


def normalize_ip(text: str) -> str:
    """Canonical text of an address; an IPv4-mapped IPv6 address becomes IPv4. Raises: ValueError."""
    address = ipaddress.ip_address(text)
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def derived_id(namespace: str, name: str) -> int:
    """The stable id of an endpoint whose inventory entry has none (same on every load)."""
    return _DERIVED_ID_BASE + zlib.crc32(f"{namespace}/{name}".encode()) % (2**31 - _DERIVED_ID_BASE)


class EndpointRegistry:
    """Endpoints by source IP, by namespace/name and by id. Immutable once built."""

    def __init__(self, endpoints: Iterable[Endpoint] = ()) -> None:
        """Raises: EndpointsError on a duplicate IP, name or id."""
        self._endpoints: tuple[Endpoint, ...] = tuple(endpoints)
        self._by_ip: dict[str, Endpoint] = {}
        self._by_name: dict[tuple[str, str], Endpoint] = {}
        self._by_id: dict[int, Endpoint] = {}
        problems = []
        for ep in self._endpoints:
            if (ep.namespace, ep.name) in self._by_name:
                problems.append(f"{ep.key}: defined twice")
            if ep.id in self._by_id:
                problems.append(f"{ep.key}: id {ep.id} is already the id of {self._by_id[ep.id].key}")
            for ip in ep.ips:
                owner = self._by_ip.get(ip)
                if owner is not None:
                    problems.append(f"{ep.key}: {ip} is already the address of {owner.key}")
                self._by_ip[ip] = ep
            self._by_name[(ep.namespace, ep.name)] = ep
            self._by_id[ep.id] = ep
        if problems:
            raise EndpointsError(problems)
        self.ips: frozenset[str] = frozenset(self._by_ip)

    def by_ip(self, ip: str) -> Endpoint | None:
        """The endpoint owning ``ip`` (any text form, IPv4-mapped included), or None. O(1)."""
        endpoint = self._by_ip.get(ip)
        if endpoint is None:
            try:
                endpoint = self._by_ip.get(normalize_ip(ip))
            except ValueError:
                return None
        return endpoint

    def by_name(self, namespace: str, name: str) -> Endpoint | None:
        return self._by_name.get((namespace, name))

    def by_id(self, endpoint_id: int) -> Endpoint | None:
        return self._by_id.get(endpoint_id)

    def workloads(self) -> tuple[Endpoint, ...]:
        """Endpoints whose traffic fqdnproxy enforces (every kind but ``service``)."""
        return tuple(ep for ep in self._endpoints if ep.kind == "workload")

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self._endpoints)

    def __len__(self) -> int:
        return len(self._endpoints)


def load_inventory(path: str | Path) -> EndpointRegistry:
    """Read an inventory file. Raises: EndpointsError listing every problem, each located."""
    label = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise EndpointsError([f"{label}: cannot read: {error}"]) from None
    return parse_inventory(label, text)


def parse_inventory(label: str, text: str) -> EndpointRegistry:
    """Parse inventory YAML text; ``label`` names the file in messages. Raises: EndpointsError."""
    problems: list[str] = []
    try:
        documents = list(yaml.load_all(text, Loader=_LOADER))
    except yaml.YAMLError as error:
        raise EndpointsError([f"{label}: invalid YAML: {_yaml_problem(error)}"]) from None
    endpoints: list[Endpoint] = []
    seen_names: dict[tuple[str, str], str] = {}
    seen_ips: dict[str, tuple[str, str]] = {}
    seen_ids: dict[int, tuple[str, str]] = {}
    for number, document in enumerate(documents, start=1):
        where = f"{label}: document {number}"
        if document is None:
            continue
        if not isinstance(document, dict) or set(document) - {"endpoints"}:
            extra = sorted(set(document) - {"endpoints"}) if isinstance(document, dict) else None
            detail = f"unknown field {extra[0]!r}; " if extra else ""
            problems.append(f"{where}: {detail}an inventory document is a mapping with one field, endpoints")
            continue
        entries = document.get("endpoints") or []
        if not isinstance(entries, list):
            problems.append(f"{where}: endpoints: must be a list of endpoints")
            continue
        for index, entry in enumerate(entries):
            path = f"endpoints[{index}]"
            endpoint = _parse_entry(f"{where}: {path}", entry, problems)
            if endpoint is None:
                continue
            ident = (endpoint.namespace, endpoint.name)
            if ident in seen_names:
                problems.append(
                    f"{where}: {path}: {endpoint.key} is already defined at {seen_names[ident]}; "
                    "each namespace/name appears once"
                )
                continue
            seen_names[ident] = f"document {number}: {path}"
            clash = False
            for ip_index, ip in enumerate(endpoint.ips):
                if ip in seen_ips:
                    owner, owner_at = seen_ips[ip]
                    problems.append(
                        f"{where}: {path}.ips[{ip_index}]: {ip} is already the address of {owner} "
                        f"({owner_at}); each address belongs to one endpoint"
                    )
                    clash = True
                else:
                    seen_ips[ip] = (endpoint.key, f"document {number}: {path}")
            if endpoint.id in seen_ids:
                owner, owner_at = seen_ids[endpoint.id]
                field_path = f"{path}.id" if isinstance(entry.get("id"), int) else path
                problems.append(
                    f"{where}: {field_path}: id {endpoint.id} is already the id of {owner} ({owner_at}); "
                    "set a distinct id"
                )
                clash = True
            else:
                seen_ids[endpoint.id] = (endpoint.key, f"document {number}: {path}")
            if not clash:
                endpoints.append(endpoint)
    if problems:
        raise EndpointsError(problems)
    return EndpointRegistry(endpoints)


def _parse_entry(where: str, entry: Any, problems: list[str]) -> Endpoint | None:
    if not isinstance(entry, dict):
        problems.append(f"{where}: must be a mapping with namespace, name, labels, ips, interface")
        return None
    before = len(problems)
    for key in entry:
        if key not in _ENTRY_KEYS:
            problems.append(f"{where}.{key}: unknown field; allowed: {', '.join(_ENTRY_KEYS)}")
    names = {}
    for key in ("namespace", "name"):
        value = entry.get(key)
        if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
            problems.append(
                f"{where}.{key}: {json.dumps(value)} is not a valid {key}; "
                "lowercase letters, digits, - and . are allowed (a Kubernetes name)"
            )
        names[key] = value
    labels = _parse_labels(f"{where}.labels", entry.get("labels"), problems)
    ips: list[str] = []
    raw_ips = entry.get("ips")
    if not isinstance(raw_ips, list) or not raw_ips:
        problems.append(f"{where}.ips: must be a non-empty list of IPv4 or IPv6 addresses")
    else:
        for index, raw in enumerate(raw_ips):
            try:
                ip = normalize_ip(str(raw))
            except ValueError:
                problems.append(f"{where}.ips[{index}]: {json.dumps(str(raw))} is not an IPv4 or IPv6 address")
                continue
            if ip in ips:
                problems.append(f"{where}.ips[{index}]: {ip} is listed twice")
            ips.append(ip)
    interface = entry.get("interface")
    if interface is not None and (not isinstance(interface, str) or not _IFNAME_RE.fullmatch(interface)):
        problems.append(
            f"{where}.interface: {json.dumps(interface)} is not an interface name; "
            "1 to 15 characters, no whitespace, / or :"
        )
    kind = entry.get("kind", "workload")
    if kind not in ("workload", "service"):
        problems.append(f"{where}.kind: {json.dumps(kind)} is not allowed; workload or service")
    endpoint_id = entry.get("id")
    if endpoint_id is not None and (
        not isinstance(endpoint_id, int) or isinstance(endpoint_id, bool) or not 1 <= endpoint_id <= MAX_ID
    ):
        problems.append(f"{where}.id: {json.dumps(endpoint_id)} is not allowed; an integer from 1 to {MAX_ID}")
    if len(problems) > before:
        return None
    return Endpoint(
        id=endpoint_id if endpoint_id is not None else derived_id(names["namespace"], names["name"]),
        namespace=names["namespace"],
        name=names["name"],
        labels=labels,
        ips=tuple(ips),
        interface=interface,
        kind=kind,
    )


def _parse_labels(where: str, raw: Any, problems: list[str]) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a mapping of label keys to string values")
        return {}
    labels = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key:
            problems.append(f"{where}: {json.dumps(str(key))} is not a label key")
            continue
        if not isinstance(value, str):
            problems.append(f"{where}.{key}: {json.dumps(value)} is not a string; quote it")
            continue
        source, _, bare = key.partition(":") if ":" in key else (model.DEFAULT_SOURCE, "", key)
        if source not in LABEL_SOURCES:
            problems.append(
                f"{where}.{key}: label source {json.dumps(source)} is not allowed; "
                f"{', '.join(LABEL_SOURCES)} (or none, meaning k8s)"
            )
            continue
        if bare == model.NAMESPACE_LABEL:
            problems.append(f"{where}.{key}: this label is derived from namespace; do not set it")
            continue
        labels[key] = value
    return labels


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is not None:
        return f"line {mark.line + 1} column {mark.column + 1}: {problem}"
    return problem
