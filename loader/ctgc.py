"""Conntrack garbage collection.

The conntrack table is a plain hash, not an LRU (bpf/lib/maps.h): when it
is full, new flows are refused an entry rather than evicting an
established one. Expired entries are therefore not reclaimed by the kernel
on their own; the datapath only ignores them (dp_ct_usable). The agent runs
ConntrackCollector, which walks the table and deletes entries past their
lifetime by the same rule as bpf/lib/conntrack.h dp_ct_lifetime_ns, plus a
margin.

A packet may revive a flow between the walk and the delete: each candidate
is read again just before it is deleted, and only deleted if it is still
expired. What is left is a window of one syscall in which the datapath
replaces an expired entry with a new flow's entry; that flow's next packet
is then judged as new.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from loader import abi
from loader.errors import DataplaneError

log = logging.getLogger("dataplane.ctgc")

# Defaults of bpf/lib/config.h; a load may override them (BuildOptions.extra_defines).
DEFAULT_TIMEOUTS = {"DP_CT_TIMEOUT_TCP": 21600, "DP_CT_TIMEOUT_OPENING": 60, "DP_CT_TIMEOUT_CLOSING": 10,
                    "DP_CT_TIMEOUT_OTHER": 60}
IPPROTO_TCP = 6
NS = 1_000_000_000


@dataclasses.dataclass(frozen=True)
class Timeouts:
    tcp: int = DEFAULT_TIMEOUTS["DP_CT_TIMEOUT_TCP"]
    opening: int = DEFAULT_TIMEOUTS["DP_CT_TIMEOUT_OPENING"]
    closing: int = DEFAULT_TIMEOUTS["DP_CT_TIMEOUT_CLOSING"]
    other: int = DEFAULT_TIMEOUTS["DP_CT_TIMEOUT_OTHER"]

    @classmethod
    def of(cls, options) -> "Timeouts":
        """The timeouts a load was built with."""
        values = dict(DEFAULT_TIMEOUTS)
        for name, value in (getattr(options, "extra_defines", None) or ()):
            if name in values:
                try:
                    values[name] = int(str(value).rstrip("uUlL"))
                except ValueError:
                    raise DataplaneError(f"{name}={value!r}: not an integer number of seconds") from None
        return cls(values["DP_CT_TIMEOUT_TCP"], values["DP_CT_TIMEOUT_OPENING"], values["DP_CT_TIMEOUT_CLOSING"],
                   values["DP_CT_TIMEOUT_OTHER"])

    def lifetime_s(self, proto: int, flags: int) -> int:
        if flags & abi.CT_CLOSING:
            return self.closing
        if proto == IPPROTO_TCP:
            return self.tcp if flags & abi.CT_SEEN_REPLY else self.opening
        return self.other


def now_ns() -> int:
    """The clock of bpf_ktime_get_coarse_ns (monotonic)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def expired(key, val, timeouts: Timeouts, now: int, margin_s: float) -> bool:
    age = now - val.last_seen_ns
    return age > (timeouts.lifetime_s(key.proto, val.flags) + margin_s) * NS


def collect(dp, timeouts: Timeouts | None = None, now: int | None = None, margin_s: float = 5.0) -> int:
    """Deletes the conntrack entries past their lifetime plus margin_s; returns how many."""
    timeouts = timeouts or Timeouts.of(dp.options)
    now = now_ns() if now is None else now
    ct = dp.ct
    candidates = [k for k, v in ct.items() if expired(k, v, timeouts, now, margin_s)]
    deleted = 0
    for key in candidates:
        val = ct.lookup(key)
        if val is not None and expired(key, val, timeouts, now, margin_s) and ct.delete(key):
            deleted += 1
    return deleted


class ConntrackCollector:
    """Runs collect() every `interval` seconds in a daemon thread."""

    def __init__(self, dp, interval: float = 10.0, margin_s: float = 5.0):
        self.dp = dp
        self.interval = interval
        self.margin_s = margin_s
        self.deleted = 0
        self.runs = 0
        self.errors = 0
        self.last_duration_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        t0 = time.monotonic()
        try:
            n = collect(self.dp, margin_s=self.margin_s)
        except (DataplaneError, OSError) as e:
            self.errors += 1
            log.error("conntrack collection failed (will retry): %s", e)
            return 0
        self.runs += 1
        self.deleted += n
        self.last_duration_s = time.monotonic() - t0
        if n:
            log.debug("conntrack: %d expired entries deleted in %.3f s", n, self.last_duration_s)
        return n

    def start(self) -> "ConntrackCollector":
        self._thread = threading.Thread(target=self._loop, name="ct-gc", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.run_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
