"""Shared helpers for the policy tests: the Cilium fixture folder and small builders."""

from __future__ import annotations

from pathlib import Path

import pytest

from fqdnproxy import endpoints
from fqdnproxy.policy import engine, load
from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]
CILIUM_FIXTURES = REPO / ".." / "shared" / "fixtures" / "cilium-policies"
POLICIES = REPO / "policies"


@pytest.fixture
def cilium_fixtures() -> Path:
    """The Cilium example policies; skipped with a reason when absent (failed under CI=true)."""
    require(CILIUM_FIXTURES.is_dir(), f"Cilium example policies not found at {CILIUM_FIXTURES}")
    return CILIUM_FIXTURES


def compile_policies(policy_yaml: str, inventory_yaml: str, label: str = "p.yaml") -> engine.PolicyEngine:
    """An engine from policy and inventory text (raises on any load problem)."""
    policy_set = load.parse_text(label, policy_yaml).policy_set()
    return engine.PolicyEngine(policy_set, endpoints.parse_inventory("inv.yaml", inventory_yaml))
