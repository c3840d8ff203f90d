"""workers.py: which worker a process is, and one process per worker index at a time."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from fqdnproxy import workers


@pytest.mark.parametrize("value, index", [(None, 0), ("", 0), ("1", 1), ("7", 7)])
def test_this_worker_reads_the_supervisors_variable(
        monkeypatch: pytest.MonkeyPatch, value: str | None, index: int) -> None:
    if value is None:
        monkeypatch.delenv(workers.WORKER_ENV, raising=False)
    else:
        monkeypatch.setenv(workers.WORKER_ENV, value)
    assert workers.this_worker() == index


@pytest.mark.parametrize("value", ["0", "8", "-1", "one", "1.5"])
def test_a_bad_worker_index_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(workers.WORKER_ENV, value)
    with pytest.raises(workers.WorkerError, match="not a worker index 1..7"):
        workers.this_worker()


def test_one_process_holds_a_worker_index_at_a_time(tmp_path: Path) -> None:
    """A second claim waits for the first holder to let go (a handover's worker waits for its
    predecessor to exit), and gives up after its timeout."""
    directory = tmp_path / "worker-1"
    held = workers.claim(directory, timeout=1.0)
    with pytest.raises(workers.WorkerError, match="still this worker after 0 s"):
        workers.claim(directory, timeout=0.2, poll=0.05)
    released = threading.Timer(0.3, os.close, (held,))  # the predecessor exits
    released.start()
    started = time.monotonic()
    second = workers.claim(directory, timeout=10.0, poll=0.05)
    assert time.monotonic() - started >= 0.25
    os.close(second)
    released.join()
