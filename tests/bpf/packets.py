"""Frame builders and observation helpers shared by the bpf tier.

Frames are plain bytes: scapy builds the well-formed parts, and the tests
patch fields (lengths, versions, offsets) to reach every parser branch.
`send` runs one frame through one hook and reads back which reason counter
moved, so every test learns the datapath's reason for its verdict from the
kernel itself, not from the return code alone.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
import warnings


from loader import abi, events, tables
from tests.bpf.conftest import run

warnings.filterwarnings("ignore", message=".*MAC address to reach destination.*")
from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.l2 import ARP, Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

# --- the two endpoints most tests use -----------------------------------------

LOCAL = {4: "10.1.0.10", 6: "fd00:1::10"}
REMOTE = {4: "192.168.7.20", 6: "fd00:7::20"}
UNKNOWN = {4: "203.0.113.9", 6: "2001:db8:99::9"}   # in no ipcache prefix: WORLD
LOCAL_ID = 300
REMOTE_ID = 400
FAMILIES = (4, 6)


def endpoint_identities() -> dict:
    """ipcache content naming LOCAL and REMOTE (both families)."""
    out = {}
    for fam, plen in ((4, 32), (6, 128)):
        out[f"{LOCAL[fam]}/{plen}"] = LOCAL_ID
        out[f"{REMOTE[fam]}/{plen}"] = REMOTE_ID
    return out


# --- hooks -----------------------------------------------------------------------

HOOKS = ("xdp_ingress", "tc_ingress", "tc_egress")
INGRESS_HOOKS = ("xdp_ingress", "tc_ingress")
DIRECTION = {"xdp_ingress": abi.Direction.INGRESS, "tc_ingress": abi.Direction.INGRESS,
             "tc_egress": abi.Direction.EGRESS}
HOOK_ID = {"xdp_ingress": abi.Hook.XDP_INGRESS, "tc_ingress": abi.Hook.TC_INGRESS,
           "tc_egress": abi.Hook.TC_EGRESS}

# --- protocol numbers -------------------------------------------------------------

TCP_P, UDP_P, ICMP_P, ICMPV6_P, GRE_P = 6, 17, 1, 58, 47
ICMP_OF = {4: ICMP_P, 6: ICMPV6_P}
ECHO_REQUEST = {4: 8, 6: 128}
ECHO_REPLY = {4: 0, 6: 129}
DEST_UNREACH = {4: 3, 6: 1}

ETH_P_IP, ETH_P_IPV6, ETH_P_ARP = 0x0800, 0x86DD, 0x0806
ETH_P_8021Q, ETH_P_8021AD = 0x8100, 0x88A8
ETHERTYPE = {4: ETH_P_IP, 6: ETH_P_IPV6}

HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS = 0, 43, 44, 51, 60

SRC_MAC = "02:00:00:00:00:01"
DST_MAC = "02:00:00:00:00:02"


# --- layer 2 -------------------------------------------------------------------------

def eth(ethertype: int, vlans=()) -> bytes:
    """Ethernet header; vlans is a sequence of (tpid, vid), outermost first."""
    hdr = bytes(Ether(src=SRC_MAC, dst=DST_MAC, type=vlans[0][0] if vlans else ethertype))
    for i, (_tpid, vid) in enumerate(vlans):
        inner = vlans[i + 1][0] if i + 1 < len(vlans) else ethertype
        hdr += struct.pack("!HH", vid & 0x0FFF, inner)
    return hdr


QINQ = ((ETH_P_8021AD, 100), (ETH_P_8021Q, 200))


# --- layer 4 -------------------------------------------------------------------------

def tcp(sport: int, dport: int, flags: str = "S", payload: bytes = b"", **kw) -> bytes:
    return bytes(TCP(sport=sport, dport=dport, flags=flags, **kw)) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return bytes(UDP(sport=sport, dport=dport) / Raw(payload)) if payload else bytes(UDP(sport=sport, dport=dport))


def icmp(family: int, type_: int, code: int = 0, ident: int = 0, seq: int = 1, body: bytes = b"") -> bytes:
    """ICMP or ICMPv6 header: type, code, checksum, then id/seq (echo) or the
    four bytes errors leave unused; checksums are not checked by the datapath."""
    return struct.pack("!BBHHH", type_, code, 0, ident, seq) + body


def echo(family: int, ident: int, reply: bool = False, payload: bytes = b"ping") -> bytes:
    return icmp(family, (ECHO_REPLY if reply else ECHO_REQUEST)[family], 0, ident, 1, payload)


# --- layer 3 -------------------------------------------------------------------------

def ext(kind: int, nh: int, size: int | None = None, frag_offset: int = 0, more: bool = False,
        ident: int = 0) -> bytes:
    """One IPv6 extension header of `size` bytes (a multiple of 8; default 8,
    24 for AH: 12 fixed bytes and a 12-byte ICV) whose next-header field is
    nh. Fragment headers are always 8 bytes."""
    if size is None:
        size = 24 if kind == AH else 8
    if kind == FRAGMENT:
        return struct.pack("!BBHI", nh, 0, (frag_offset << 3) | int(more), ident)
    if kind == AH:
        return struct.pack("!BBHII", nh, size // 4 - 2, 0, 0x1000, 1) + bytes(size - 12)
    return bytes([nh, size // 8 - 1]) + bytes(size - 2)


def ipv6_chain(kinds, final_proto: int, **frag) -> tuple[int, bytes]:
    """(first next-header value, header bytes) for a chain of extension headers."""
    out = b""
    for i, kind in enumerate(kinds):
        nh = kinds[i + 1] if i + 1 < len(kinds) else final_proto
        out += ext(kind, nh, **(frag if kind == FRAGMENT else {}))
    return (kinds[0] if kinds else final_proto), out


def ip(family: int, src: str, dst: str, proto: int, payload: bytes, exts=(), **over) -> bytes:
    """IPv4 or IPv6 packet carrying payload. For IPv6, exts are extension
    header kinds put between the fixed header and payload. `over` overrides
    header fields by their scapy names (ihl, len, frag, flags, id, options,
    version for IPv4; plen, nh, version for IPv6)."""
    if family == 4:
        return bytes(IP(src=src, dst=dst, proto=proto, **over) / Raw(payload))
    first, chain = ipv6_chain(list(exts), proto, **{k: over.pop(k) for k in ("frag_offset", "more", "ident")
                                                     if k in over})
    return bytes(IPv6(src=src, dst=dst, nh=first, **over) / Raw(chain + payload))


def frame(family: int, src: str, dst: str, proto: int, l4: bytes, vlans=(), exts=(), **over) -> bytes:
    return eth(ETHERTYPE[family], vlans) + ip(family, src, dst, proto, l4, exts, **over)


def tcp_frame(family: int, src: str, dst: str, sport: int, dport: int, flags: str = "S",
              payload: bytes = b"", vlans=(), exts=(), **over) -> bytes:
    return frame(family, src, dst, TCP_P, tcp(sport, dport, flags, payload), vlans, exts, **over)


def udp_frame(family: int, src: str, dst: str, sport: int, dport: int, payload: bytes = b"", **kw) -> bytes:
    return frame(family, src, dst, UDP_P, udp(sport, dport, payload), **kw)


def echo_frame(family: int, src: str, dst: str, ident: int, reply: bool = False, **kw) -> bytes:
    return frame(family, src, dst, ICMP_OF[family], echo(family, ident, reply), **kw)


def icmp_error_frame(family: int, src: str, dst: str, quoted: bytes, type_: int | None = None,
                     code: int = 0) -> bytes:
    """An ICMP error from src to dst whose body is `quoted` (an IP packet or a
    prefix of one)."""
    type_ = DEST_UNREACH[family] if type_ is None else type_
    return frame(family, src, dst, ICMP_OF[family], icmp(family, type_, code, body=quoted))


def arp_frame(vlans=()) -> bytes:
    return eth(ETH_P_ARP, vlans) + bytes(ARP(op=1, psrc=LOCAL[4], pdst=REMOTE[4], hwsrc=SRC_MAC))


# --- observing the datapath ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: abi.Reason


def reason_delta(before: dict, after: dict) -> dict:
    out = {}
    for reason in set(before) | set(after):
        b, a = before.get(reason, (0, 0)), after.get(reason, (0, 0))
        if a != b:
            out[reason] = (a[0] - b[0], a[1] - b[1])
    return out


def send(dp, hook: str, data: bytes) -> Outcome:
    """Runs one frame through one hook. Exactly one reason counter must move,
    by one packet and the frame's bytes, and the hook's return code must agree
    with that reason (pass below DP_REASON_FIRST_DROP, drop from it on)."""
    before = dp.reason_counters()
    passed = run(dp, hook, data)
    delta = reason_delta(before, dp.reason_counters())
    assert len(delta) == 1, f"{hook}: expected one reason counter to move, got {delta}"
    (reason, counted), = delta.items()
    assert counted == (1, len(data)), f"{hook}: reason {reason!r} counted {counted}, want (1, {len(data)})"
    reason = abi.Reason(reason)
    assert passed == (not reason.is_drop), f"{hook}: returned {'pass' if passed else 'drop'} with reason {reason.name}"
    return Outcome(passed, reason)


def expect(dp, hook: str, data: bytes, reason: abi.Reason) -> Outcome:
    out = send(dp, hook, data)
    assert out.reason == reason, f"{hook}: reason {out.reason.name}, want {reason.name}"
    return out


def rule_counts(dp, rule_ids) -> dict[int, tuple[int, int]]:
    return {r: dp.rule_counter(r) for r in rule_ids}


def counts_delta(before: dict, after: dict) -> dict:
    return {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in before}


class EventTap:
    """Reads verdict events from the shared ring buffer. Events other tests
    left behind are discarded when the tap opens."""

    def __init__(self, dp):
        self._got: list[events.FlowEvent] = []
        self._reader = events.EventReader(dp.events.fd, self._got.append)
        self._reader.drain()
        self._got.clear()

    def take(self) -> list[events.FlowEvent]:
        self._reader.drain()
        out, self._got[:] = list(self._got), []
        return out

    def one(self) -> events.FlowEvent:
        got = self.take()
        assert len(got) == 1, f"expected one event, got {len(got)}: {got}"
        return got[0]

    def close(self) -> None:
        self._reader.close()


def allow_both_ways(local_id: int, remote_id: int, proto: int, lo: int, hi: int, rule_id: int,
                    action: int = abi.Verdict.ALLOW) -> list[tables.PolicyEntry]:
    """Entries letting the two identities open flows to each other in both
    directions, so a packet between them is judged the same at every hook."""
    out = []
    for a, b in ((local_id, remote_id), (remote_id, local_id)):
        for d in abi.Direction:
            out.append(tables.PolicyEntry(a, b, d, proto, lo, hi, action, rule_id))
    return out


def addr(text: str):
    return ipaddress.ip_address(text)
