"""Reading verdict events from the pinned dp_events ring buffer (libbpf
ring_buffer API) and decoding them into flow records."""

from __future__ import annotations

import ctypes
import dataclasses

from loader import abi, libbpf
from loader.errors import DataplaneError


@dataclasses.dataclass(frozen=True)
class FlowEvent:
    ts_ns: int
    src: abi.IpAddress | None
    dst: abi.IpAddress | None
    sport: int
    dport: int
    proto: int
    direction: abi.Direction
    verdict: abi.Verdict
    reason: abi.Reason
    hook: abi.Hook
    rule_id: int
    local_id: int
    remote_id: int
    ifindex: int
    pkt_len: int

    @classmethod
    def decode(cls, raw: bytes) -> "FlowEvent":
        e = abi.Event.from_buffer_copy(raw[: ctypes.sizeof(abi.Event)])
        family_ok = e.family in (abi.Family.IPV4, abi.Family.IPV6)
        return cls(
            ts_ns=e.ts_ns,
            src=abi.addr_from_c(e.family, e.saddr) if family_ok else None,
            dst=abi.addr_from_c(e.family, e.daddr) if family_ok else None,
            sport=abi.ntohs(e.sport), dport=abi.ntohs(e.dport), proto=e.proto,
            direction=abi.Direction(e.dir), verdict=abi.Verdict(e.verdict),
            reason=_reason(e.reason), hook=abi.Hook(e.hook), rule_id=e.rule_id,
            local_id=e.local_id, remote_id=e.remote_id, ifindex=e.ifindex, pkt_len=e.pkt_len)


def _reason(value: int):
    try:
        return abi.Reason(value)
    except ValueError:
        return value


class EventReader:
    """Consumes the ring buffer. poll()/drain() call on_event(FlowEvent)
    for each record; only the reading thread may call them."""

    def __init__(self, ring_fd: int, on_event):
        self._on_event = on_event
        self._error: BaseException | None = None

        def _cb(_ctx, data, size):
            try:
                self._on_event(FlowEvent.decode(ctypes.string_at(data, size)))
            except BaseException as exc:  # never let an exception cross into C
                self._error = exc
                return -1
            return 0

        self._cb = libbpf.RING_BUFFER_SAMPLE_FN(_cb)
        self._rb = libbpf.lib().ring_buffer__new(ring_fd, self._cb, None, None)
        if not self._rb:
            raise DataplaneError("cannot open the events ring buffer")

    def poll(self, timeout_ms: int = 100) -> int:
        n = libbpf.lib().ring_buffer__poll(self._rb, timeout_ms)
        self._raise()
        return n

    def drain(self) -> int:
        n = libbpf.lib().ring_buffer__consume(self._rb)
        self._raise()
        return n

    def _raise(self):
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        if self._rb:
            libbpf.lib().ring_buffer__free(self._rb)
            self._rb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
