"""loader.ctgc: the collector's lifetimes follow bpf/lib/conntrack.h, and a
load's overrides of the timeouts reach it."""

from __future__ import annotations

import pytest

from loader import abi, ctgc
from loader.compile import BuildOptions
from loader.errors import DataplaneError

TCP, UDP = 6, 17


def test_lifetimes_follow_the_datapath():
    t = ctgc.Timeouts()
    assert t.lifetime_s(TCP, 0) == 60                                  # SYN, no answer yet
    assert t.lifetime_s(TCP, abi.CT_SEEN_REPLY) == 21600               # answered
    assert t.lifetime_s(TCP, abi.CT_SEEN_REPLY | abi.CT_CLOSING) == 10
    assert t.lifetime_s(TCP, abi.CT_CLOSING) == 10
    assert t.lifetime_s(UDP, 0) == t.lifetime_s(UDP, abi.CT_SEEN_REPLY) == 60


def test_overrides_from_the_build_options():
    opts = BuildOptions(pin_dir="/sys/fs/bpf/x", extra_defines=(("DP_CT_TIMEOUT_OPENING", "5"),
                                                                ("DP_CT_TIMEOUT_TCP", "3600U")))
    t = ctgc.Timeouts.of(opts)
    assert (t.opening, t.tcp, t.closing, t.other) == (5, 3600, 10, 60)
    assert ctgc.Timeouts.of(None) == ctgc.Timeouts()
    with pytest.raises(DataplaneError, match="DP_CT_TIMEOUT_OTHER"):
        ctgc.Timeouts.of(BuildOptions(pin_dir="/x", extra_defines=(("DP_CT_TIMEOUT_OTHER", "soon"),)))


def test_expired_uses_the_margin():
    class K:
        proto = UDP

    class V:
        flags = 0
        last_seen_ns = 0

    t = ctgc.Timeouts()
    assert not ctgc.expired(K, V, t, now=64 * ctgc.NS, margin_s=5)
    assert ctgc.expired(K, V, t, now=66 * ctgc.NS, margin_s=5)
    assert ctgc.expired(K, V, t, now=61 * ctgc.NS, margin_s=0)
