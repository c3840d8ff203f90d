"""datapath/portmath.py: merging and subtracting port ranges for allow entries."""

from __future__ import annotations

import pytest

from fqdnproxy.datapath import portmath
from fqdnproxy.datapath.allowmap import PortRange as R
from fqdnproxy.policy import model


def _s(ranges: tuple[R, ...]) -> list[str]:
    return [str(r) for r in ranges]


@pytest.mark.parametrize("given, merged", [
    ((R(6, 443, 443), R(6, 80, 80)), ["tcp/80", "tcp/443"]),
    ((R(6, 80, 90), R(6, 91, 100), R(6, 95, 120)), ["tcp/80-120"]),
    ((R(0, 0, 65535), R(6, 443, 443)), ["any"]),  # any protocol already admits tcp/443
    ((R(6, 1, 1), R(17, 1, 1)), ["tcp/1", "udp/1"]),
    (portmath.NO_PORTS + (R(6, 22, 22),), ["tcp/22"]),
])
def test_merge(given: tuple[R, ...], merged: list[str]) -> None:
    assert _s(portmath.merge(given)) == merged


def test_merge_refuses_to_widen() -> None:
    with pytest.raises(portmath.TooManyRanges, match="9 disjoint port ranges"):
        portmath.merge(tuple(R(6, p, p) for p in range(1, 18, 2)))


@pytest.mark.parametrize("ranges, minus, left", [
    ((R(6, 0, 65535),), (R(6, 22, 22),), ["tcp/0-21", "tcp/23-65535"]),
    ((R(6, 443, 443),), (R(0, 0, 65535),), []),  # a deny of everything leaves nothing
    ((R(0, 0, 65535),), (R(6, 25, 25),), ["tcp/0-24", "tcp/26-65535", "udp"]),
    ((R(6, 80, 80), R(17, 53, 53)), (R(17, 0, 65535),), ["tcp/80"]),
    ((R(6, 80, 80),), (), ["tcp/80"]),
])
def test_subtract(ranges: tuple[R, ...], minus: tuple[R, ...], left: list[str]) -> None:
    assert _s(portmath.subtract(ranges, minus)) == left


def test_from_policy() -> None:
    ports = model.PortSet((model.PortRange("TCP", 443, 443), model.PortRange("ANY", 53, 53)))
    assert _s(portmath.from_policy(ports)) == ["tcp/443", "any/53"]
