"""Shared test plumbing: the ``root`` mark and the CI rule that such tests never skip.

A test marked ``root`` needs root, BPF or network namespaces. Outside CI it skips with a reason
when those are missing; under ``CI=true`` it fails instead, because a CI run that silently skips
the datapath has tested nothing.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip (or, under CI=true, fail) the running test unless ``condition`` holds."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        require(os.geteuid() == 0, "needs root (tier-3 test: BPF, netns, tc)")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Leave /run as found: the leftovers ledger directory goes once it is empty."""
    if os.geteuid() == 0:
        from tests.datapath import leftovers

        leftovers.tidy()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Async tests run on uvloop, the loop the agent runs on in production."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}
