"""Watching the policy directory and the endpoints file; validated, atomic swaps.

``PolicyStore.check_for_changes()`` is meant to be called periodically from a worker thread (it
stats and reads files, and compiles). It compares a stat fingerprint first (cheap), then a hash of
the contents, so touching a file does not rebuild anything. A change that does not load is
rejected with its messages and the previous snapshot keeps serving; the same broken content is
reported once, not on every poll. A swap is one attribute assignment, so readers on other threads
see either the old snapshot or the new one, never a mix.

Timeline of a write racing a poll (why the stat is taken before the read)::

    poll: stat (t0) ........ read files ........ record stat t0
    editor:          write (t1)
    next poll: stat (t1) != t0 -> read again -> same hash as loaded -> unchanged
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

from fqdnproxy import endpoints
from fqdnproxy.errors import FqdnproxyError
from fqdnproxy.policy import engine, load, model


class ReloadError(FqdnproxyError):
    """The policies or the endpoint inventory do not load."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent version: policies, endpoints and the engine compiled from both."""

    version: int
    policy_set: model.PolicySet
    registry: endpoints.EndpointRegistry
    engine: engine.PolicyEngine
    digest: str  # sha256 over every file's name and contents

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.policy_set.warnings


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What one ``check_for_changes`` did."""

    status: Literal["unchanged", "reloaded", "rejected"]
    current: Snapshot
    previous: Snapshot | None = None  # set when reloaded
    errors: tuple[str, ...] = ()  # set when rejected
    warnings: tuple[str, ...] = ()
    changed_endpoints: tuple[int, ...] = field(default=())

    def changed_selections(self, names_by_endpoint: Mapping[int, Iterable[str]]) -> list[engine.SelectionChange]:
        """Selections of already-resolved names that this reload changed (none unless reloaded)."""
        if self.status != "reloaded":
            return []
        previous = self.previous.engine if self.previous is not None else None
        return engine.changed_selections(previous, self.current.engine, names_by_endpoint)


class PolicyStore:
    """The serving snapshot of the policy directory (or files) and the endpoints file."""

    def __init__(self, policy_paths: Sequence[str | Path] | str | Path, endpoints_file: str | Path,
                 settle: float = 0.0) -> None:
        """``settle``: seconds a changed file must stay untouched before it is read, so a file
        caught half-written (``rm *; cp new/* .``, an editor saving in steps) is not taken for
        a complete one that happens to be valid."""
        self.settle = settle
        if isinstance(policy_paths, (str, Path)):
            policy_paths = [policy_paths]
        self.policy_paths = [Path(p) for p in policy_paths]
        self.endpoints_file = Path(endpoints_file)
        self._lock = threading.Lock()
        self._current: Snapshot | None = None
        self._stat: tuple[object, ...] | None = None
        self._rejected_digest: str | None = None
        self.rejected: tuple[str, ...] = ()  # messages of the last rejected change, until fixed

    @property
    def current(self) -> Snapshot:
        """The snapshot serving now. Raises: ReloadError if ``load`` never succeeded."""
        snapshot = self._current
        if snapshot is None:
            raise ReloadError(["policies not loaded yet"])
        return snapshot

    def load(self) -> Snapshot:
        """Load for the first time. Raises: ReloadError listing every problem."""
        with self._lock:
            stat = self._fingerprint()
            texts, digest = self._read()
            snapshot = self._build(texts, digest, 1)
            self._current, self._stat = snapshot, stat
            return snapshot

    def check_for_changes(self) -> ReloadResult:
        """Reload if the files changed; blocking (stat, read, compile): run it in a thread."""
        with self._lock:
            current = self.current
            stat = self._fingerprint()
            if stat == self._stat:
                return ReloadResult("unchanged", current)
            if self.settle and _newest(stat) > time.time_ns() - int(self.settle * 1e9):
                return ReloadResult("unchanged", current)  # still being written: next poll
            texts, digest = self._read()
            if digest in (current.digest, self._rejected_digest):
                self._stat = stat
                return ReloadResult("unchanged", current)
            try:
                snapshot = self._build(texts, digest, current.version + 1)
            except ReloadError as error:
                self._stat, self._rejected_digest, self.rejected = stat, digest, error.problems
                return ReloadResult("rejected", current, errors=error.problems)
            self._current, self._stat, self._rejected_digest, self.rejected = snapshot, stat, None, ()
            changed = engine.changed_endpoints(current.engine, snapshot.engine)
            return ReloadResult("reloaded", snapshot, previous=current,
                                warnings=snapshot.warnings, changed_endpoints=tuple(changed))

    def _files(self) -> list[Path]:
        return load.policy_files(self.policy_paths)

    def _fingerprint(self) -> tuple[tuple[object, ...], ...]:
        entries: list[object] = []
        for path in [*self.policy_paths, *self._files(), self.endpoints_file]:
            try:
                st = os.stat(path)
                entries.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError as error:
                entries.append((str(path), type(error).__name__))
        return tuple(entries)

    def _read(self) -> tuple[list[tuple[str, str | None, str]], str]:
        digest = hashlib.sha256()
        texts: list[tuple[str, str | None, str]] = []
        for path in [*self._files(), self.endpoints_file]:
            try:
                text: str | None = path.read_text(encoding="utf-8")
                problem = ""
            except (OSError, UnicodeDecodeError) as error:
                text, problem = None, f"cannot read: {error}"
            digest.update(f"{path}\0{problem}\0{text or ''}\0".encode())
            texts.append((str(path), text, problem))
        return texts, digest.hexdigest()

    def _build(self, texts: list[tuple[str, str | None, str]], digest: str, version: int) -> Snapshot:
        *policy_texts, (inventory_label, inventory_text, inventory_problem) = texts
        problems: list[str] = []
        report = load.check_texts(policy_texts, where=", ".join(str(p) for p in self.policy_paths))
        problems.extend(str(p) for p in report.errors)
        registry = None
        if inventory_text is None:
            problems.append(f"{inventory_label}: {inventory_problem}")
        else:
            try:
                registry = endpoints.parse_inventory(inventory_label, inventory_text)
            except endpoints.EndpointsError as error:
                problems.extend(error.problems)
        if problems or registry is None:
            raise ReloadError(problems)
        policy_set = report.policy_set()
        return Snapshot(version, policy_set, registry, engine.PolicyEngine(policy_set, registry), digest)


def _newest(fingerprint: tuple[tuple[object, ...], ...]) -> int:
    """The latest modification time (ns) in a fingerprint; 0 when no file has one."""
    return max((entry[1] for entry in fingerprint if isinstance(entry[1], int)), default=0)
