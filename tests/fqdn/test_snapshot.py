"""fqdn/snapshot.py: atomic save, load with expiry and boot checks, corrupt files ignored."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fqdnproxy.fqdn import snapshot
from fqdnproxy.fqdn.cache import FqdnCache

S = 1_000_000_000


def _cache() -> FqdnCache:
    cache = FqdnCache()
    cache.learn(1, "api.test.", [("192.0.2.1", 100 * S), ("2001:db8::1", 100 * S)])
    cache.learn(2, "old.test.", [("192.0.2.2", 5 * S)])
    return cache


def _document(cache: FqdnCache, boot: str = "boot-a") -> bytes:
    entries = [e for chunk in cache.snapshot_chunks(1) for e in chunk]
    return snapshot.encode(entries, 1 * S, 1_700_000_000.0, boot)


def test_round_trip_drops_what_expired_meanwhile(tmp_path: Path) -> None:
    path = snapshot.save(tmp_path, _document(_cache()))
    assert path.name == snapshot.FILE_NAME
    loaded = snapshot.load(tmp_path, 10 * S, "boot-a")
    assert sorted((e.endpoint_id, e.name, e.ip) for e in loaded.entries) == [
        (1, "api.test.", "192.0.2.1"), (1, "api.test.", "2001:db8::1")]
    assert loaded.expired == 1
    restored = FqdnCache()
    assert restored.restore(loaded.entries) == 2
    assert restored.ips(1, "api.test.") == {"192.0.2.1": 100 * S, "2001:db8::1": 100 * S}


def test_no_temporary_file_is_left_behind(tmp_path: Path) -> None:
    snapshot.save(tmp_path, _document(_cache()))
    snapshot.save(tmp_path, _document(_cache()))
    assert os.listdir(tmp_path) == [snapshot.FILE_NAME]


@pytest.mark.parametrize("content, note", [
    (b"{not json", "corrupt snapshot ignored"),
    (b'{"version": 99}', "snapshot version 99"),
    (b'{"version": 1, "boot_id": "boot-a", "entries": [[1, 2]]}', "corrupt snapshot ignored"),
])
def test_bad_snapshots_are_ignored_with_a_note(tmp_path: Path, content: bytes, note: str) -> None:
    (tmp_path / snapshot.FILE_NAME).write_bytes(content)
    loaded = snapshot.load(tmp_path, 0, "boot-a")
    assert loaded.entries == () and note in loaded.note


def test_snapshot_from_another_boot_is_ignored(tmp_path: Path) -> None:
    snapshot.save(tmp_path, _document(_cache(), boot="boot-a"))
    loaded = snapshot.load(tmp_path, 0, "boot-b")
    assert loaded.entries == () and "reboot" in loaded.note


def test_missing_snapshot_is_not_an_error(tmp_path: Path) -> None:
    assert snapshot.load(tmp_path, 0, "x").note == "no snapshot"


def test_unwritable_directory_raises_snapshot_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(snapshot.SnapshotError, match="cannot write"):
        snapshot.save(blocker / "state", b"{}")


def test_chunks_survive_changes_between_them() -> None:
    cache = FqdnCache()
    for i in range(50):
        cache.learn(1, f"n{i}.test.", [(f"192.0.2.{i}", 100 * S)])
    seen = 0
    for chunk in cache.snapshot_chunks(10):
        seen += len(chunk)
        cache.learn(1, f"new{seen}.test.", [("198.51.100.1", 100 * S)])  # mutate in between
        cache.remove_name(1, f"n{seen}.test.")
    assert seen >= 40
