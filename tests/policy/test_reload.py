"""PolicyStore: validated, atomic reloads; the previous version keeps serving on error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from fqdnproxy.policy import reload

POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: demo}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
  - toFQDNs: [{matchPattern: "*.demo.test"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""
INVENTORY = "endpoints:\n- {namespace: demo, name: web, id: 7, labels: {app: web}, ips: [198.51.100.7]}\n"


def write(path: Path, text: str) -> None:
    """Write and move the mtime forward, so coarse filesystem clocks still see a change."""
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))


@pytest.fixture
def store(tmp_path: Path) -> reload.PolicyStore:
    (tmp_path / "policies").mkdir()
    write(tmp_path / "policies" / "web.yaml", POLICY)
    write(tmp_path / "endpoints.yaml", INVENTORY)
    store = reload.PolicyStore(tmp_path / "policies", tmp_path / "endpoints.yaml")
    store.load()
    return store


def test_initial_load_and_unchanged(store: reload.PolicyStore) -> None:
    assert store.current.version == 1
    assert str(store.current.engine.for_id(7).select("a.demo.test.")) == "TCP/443"  # type: ignore[union-attr]
    result = store.check_for_changes()
    assert result.status == "unchanged" and result.current is store.current


def test_touch_without_change_does_not_rebuild(store: reload.PolicyStore) -> None:
    write(store.policy_paths[0] / "web.yaml", POLICY)
    before = store.current
    assert store.check_for_changes().status == "unchanged"
    assert store.current is before


def test_change_is_swapped_in_with_changed_selections(store: reload.PolicyStore) -> None:
    old = store.current
    write(store.policy_paths[0] / "web.yaml", POLICY.replace('"443"', '"8443"'))
    result = store.check_for_changes()
    assert result.status == "reloaded"
    assert result.previous is old and result.current is store.current and store.current.version == 2
    [change] = result.changed_selections({7: ["a.demo.test.", "other.example."]})
    assert (change.endpoint_id, change.name, str(change.before), str(change.after)) == (
        7, "a.demo.test.", "TCP/443", "TCP/8443")
    assert result.changed_endpoints == ()


def test_invalid_change_is_rejected_and_old_version_keeps_serving(store: reload.PolicyStore) -> None:
    old = store.current
    policy_file = store.policy_paths[0] / "web.yaml"
    write(policy_file, POLICY.replace("*.demo.test", "*.demo test"))
    result = store.check_for_changes()
    assert result.status == "rejected"
    assert result.errors == (
        f'{policy_file}: document 1: spec.egress[0].toFQDNs[0].matchPattern: "*.demo test" contains " "; '
        "only letters, digits and - _ . * are allowed",)
    assert store.current is old and result.current is old
    assert store.rejected == result.errors
    assert result.changed_selections({7: ["a.demo.test."]}) == []
    # the same broken content is reported once
    write(policy_file, POLICY.replace("*.demo.test", "*.demo test"))
    assert store.check_for_changes().status == "unchanged"
    # fixed: swapped in
    write(policy_file, POLICY.replace("*.demo.test", "**.demo.test"))
    fixed = store.check_for_changes()
    assert fixed.status == "reloaded" and store.rejected == ()
    assert store.current.engine.for_id(7).select("a.b.demo.test.") is not None  # type: ignore[union-attr]


def test_endpoints_file_is_watched(store: reload.PolicyStore) -> None:
    write(store.endpoints_file, INVENTORY + "- {namespace: demo, name: web2, id: 8, labels: {app: web}, "
          "ips: [198.51.100.7]}\n")
    rejected = store.check_for_changes()
    assert rejected.status == "rejected"
    assert rejected.errors == (
        f"{store.endpoints_file}: document 1: endpoints[1].ips[0]: 198.51.100.7 is already the address of "
        "demo/web (document 1: endpoints[0]); each address belongs to one endpoint",)
    write(store.endpoints_file, INVENTORY + "- {namespace: demo, name: web2, id: 8, labels: {app: web}, "
          "ips: [198.51.100.8]}\n")
    result = store.check_for_changes()
    assert result.status == "reloaded" and result.changed_endpoints == (8,)
    assert store.current.registry.by_ip("198.51.100.8").name == "web2"  # type: ignore[union-attr]


def test_new_and_deleted_policy_files(store: reload.PolicyStore) -> None:
    extra = store.policy_paths[0] / "extra.yaml"
    write(extra, POLICY.replace("name: web,", "name: extra,").replace('"443"', '"80"'))
    result = store.check_for_changes()
    assert result.status == "reloaded"
    assert str(store.current.engine.for_id(7).select("a.demo.test.")) == "TCP/80, TCP/443"  # type: ignore[union-attr]
    extra.unlink()
    assert store.check_for_changes().status == "reloaded"
    assert str(store.current.engine.for_id(7).select("a.demo.test.")) == "TCP/443"  # type: ignore[union-attr]


def test_initial_load_failure_raises(tmp_path: Path) -> None:
    store = reload.PolicyStore([tmp_path / "missing"], tmp_path / "endpoints.yaml")
    with pytest.raises(reload.ReloadError) as error:
        store.load()
    assert [p.split(":")[0] for p in error.value.problems] == [str(tmp_path / "missing"), str(tmp_path / "endpoints.yaml")]
    with pytest.raises(reload.ReloadError, match="not loaded"):
        store.current  # noqa: B018


EMPTY_SET = "an empty policy set would stop enforcement for every endpoint"

# A reload caught halfway through ``rm *; cp new/* .`` must not turn enforcement off.
EMPTIED = [
    pytest.param(lambda d: (d / "web.yaml").unlink(),
                 f"no policies found: no policy files (*.yaml, *.yml); {EMPTY_SET}", id="files-removed"),
    pytest.param(lambda d: write(d / "web.yaml", ""),
                 f"no policies found: 1 file holds no policy document; {EMPTY_SET}", id="file-truncated"),
    pytest.param(lambda d: write(d / "web.yaml", "# replaced soon\n---\n"),
                 f"no policies found: 1 file holds no policy document; {EMPTY_SET}", id="comments-only"),
]


@pytest.mark.parametrize("empty,message", EMPTIED)
def test_emptied_directory_is_rejected_and_old_version_keeps_serving(
        store: reload.PolicyStore, empty: Callable[[Path], object], message: str) -> None:
    old = store.current
    policy_dir = store.policy_paths[0]
    empty(policy_dir)
    result = store.check_for_changes()
    assert result.status == "rejected"
    assert result.errors == (f"{policy_dir}: {message}",) and store.rejected == result.errors
    assert store.current is old and store.current.engine.for_id(7).enforced  # type: ignore[union-attr]
    write(policy_dir / "web.yaml", POLICY.replace('"443"', '"8443"'))  # the copy completes
    assert store.check_for_changes().status == "reloaded" and store.rejected == ()
    assert str(store.current.engine.for_id(7).select("a.demo.test.")) == "TCP/8443"  # type: ignore[union-attr]


def test_initial_load_of_an_empty_directory_fails(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    write(tmp_path / "endpoints.yaml", INVENTORY)
    store = reload.PolicyStore(tmp_path / "policies", tmp_path / "endpoints.yaml")
    with pytest.raises(reload.ReloadError) as error:
        store.load()
    assert error.value.problems == (
        f"{tmp_path / 'policies'}: no policies found: no policy files (*.yaml, *.yml); {EMPTY_SET}",)


def test_a_change_is_read_only_once_its_files_stand_still(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    write(tmp_path / "policies" / "web.yaml", POLICY)
    write(tmp_path / "endpoints.yaml", INVENTORY)
    settling = reload.PolicyStore(tmp_path / "policies", tmp_path / "endpoints.yaml", settle=60)
    settling.load()
    policy = tmp_path / "policies" / "web.yaml"
    # Caught half-written: valid YAML, a valid policy, but not the one being written.
    policy.write_text(POLICY.replace('"443"', '"8443"'))
    assert settling.check_for_changes().status == "unchanged"  # written just now: wait
    for path in (policy, tmp_path / "policies", tmp_path / "endpoints.yaml"):  # still since
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - 120 * 10**9))
    assert settling.check_for_changes().status == "reloaded"
