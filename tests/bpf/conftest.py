"""One datapath instance for the whole bpf tier: compiling costs seconds, so
the programs are built once and the maps are reset before each test."""

from __future__ import annotations

import ctypes
import os

import pytest

from loader import abi, testrun
from loader.instance import Datapath
from tests.conftest import require_root

XDP_DROP, XDP_PASS = testrun.XDP_DROP, testrun.XDP_PASS
TC_SHOT, TC_UNSPEC = testrun.TC_ACT_SHOT, testrun.TC_ACT_UNSPEC


@pytest.fixture(scope="session")
def loaded_datapath():
    require_root()
    dp = Datapath(f"dptest_bpf_{os.getpid()}")
    dp.load()
    try:
        yield dp
    finally:
        dp.unload()


def reset(dp: Datapath) -> None:
    """Empties every table and zeroes every counter; config back to defaults."""
    for attr in ("ct", "frag", "policy", "ipcache", "plens", "gen"):
        dp.maps[attr].clear()
    zero_set = abi.RangeSet()
    for i in range(1, 64):  # tests use low range-set indices only
        dp.ranges.update(i, zero_set)
    dp.maps["config"].update(0, abi.Config())
    zero = abi.Counter()
    per_cpu = [zero] * dp.rules.ncpus
    for i in range(abi.REASON_MAX):
        dp.reasons.update(i, per_cpu)
    for i in range(0, 4096):
        dp.rules.update(i, per_cpu)
    zero64 = [ctypes.c_uint64(0)] * dp.stats.ncpus
    for i in range(abi.STAT_MAX):
        dp.stats.update(i, zero64)


@pytest.fixture
def dp(loaded_datapath):
    reset(loaded_datapath)
    return loaded_datapath


def run(dp: Datapath, hook: str, frame: bytes) -> bool:
    """Runs one frame through a hook's program; True when it passes."""
    r = testrun.test_run(dp.prog_fds[hook], bytes(frame))
    if hook == "xdp_ingress":
        assert r.retval in (XDP_PASS, XDP_DROP), f"unexpected XDP return {r.retval}"
        return r.retval == XDP_PASS
    assert r.retval in (TC_UNSPEC, TC_SHOT), f"unexpected TC return {r.retval}"
    return r.retval == TC_UNSPEC


@pytest.fixture
def tap(dp):
    """Reads the verdict events the test's packets emit."""
    from tests.bpf.packets import EventTap

    t = EventTap(dp)
    try:
        yield t
    finally:
        t.close()
