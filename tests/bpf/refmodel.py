"""Pure-Python reference model of what one hook does with one frame.

Written from the documented semantics (the enum dp_reason comments in
bpf/include/dp_abi.h, the header comments of bpf/lib/*.h), not from the C
code: it parses the frame its own way and keeps its own conntrack and
fragment tables, and it asks loader.model.Model for the policy decision of a
new flow. tests/bpf/test_packet_fuzz.py runs random and malformed frames
through the kernel and through this model and requires the same verdict and
reason for every one.

What it states:
- Ethernet and at most two 802.1Q/802.1ad tags; a third tag is too deep.
  ARP passes, other non-IP EtherTypes pass (the default build).
- IPv4: version, IHL of at least 5, total length between the header and the
  frame (0 means unknown: GSO), options present in the frame; a fragment
  offset makes a later fragment, offset 0 with MF a first fragment.
- IPv6: version, payload length within the frame (0: jumbogram), an
  extension-header walk of at most 6 headers and 1024 bytes; a Fragment
  header with an offset ends the walk (later fragment), one with M set marks
  a first fragment. Headers are bounded by the frame.
- Transport: TCP needs its 20 bytes and a data offset of at least 5, UDP 8,
  ICMP and ICMPv6 8 (either version's header has the same layout). ICMP of
  the other IP version is a plain protocol. ICMPv6 ND (133-137), and MLD
  (130-132, 143) to a multicast group, pass. An echo's identifier is both
  ports. An error is judged as the flow it quotes: a whole fixed IP header
  of the error's family, an IPv6 extension walk, and the ports (or the echo
  identifier) unless the quoted packet is a later fragment; anything cut
  short is ICMP-truncated.
- Pipeline: a later fragment takes its first fragment's verdict (datagram
  key: addresses, id, and for IPv4 the protocol). Conntrack is one entry per
  flow, found from both sides; an echo request is part of the exchange only
  from the initiator and an echo reply only from the responder. FIN/RST on
  a tracked flow closes it, and a SYN reusing a closing tuple is new. An ICMP
  error about a tracked flow is related; about an untracked one it is judged
  as the quoted packet in the opposite direction. New flows are judged by
  the policy model and enter conntrack only when they pass.
- Epochs: a new state (set_policy) makes every tracked flow stale. Its next
  packet is judged again as the flow's first packet was (same addresses,
  service port and direction): still allowed, it passes as re-judged (an
  ICMP error as related) and the flow is current again; now denied, the
  entry is deleted and the packet dropped as revoked.
Timeouts are not modelled: callers clear both tables more often than any
timeout can fire. The fuzzer found two datapath bugs against these semantics,
both fixed: a quoted ICMP echo of the other IP version gave its identifier as
ports, and an ICMP error's fragments were keyed by the quoted flow (and kept
only for a tracked error), so its later fragments found no first.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

from loader import abi
from loader.model import Model

R = abi.Reason

ETH_HLEN = 14
VLAN_TPIDS = (0x8100, 0x88A8)
MAX_VLAN_TAGS = 2
ETH_P_IP, ETH_P_IPV6, ETH_P_ARP = 0x0800, 0x86DD, 0x0806

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS = 0, 43, 44, 51, 60
IPV6_EXT = frozenset((HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS))
IPV6_MAX_EXT = 6
IPV6_EXT_MAX_BYTES = 1024

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10

ICMP_ERRORS = {4: frozenset((3, 4, 5, 11, 12)), 6: frozenset((1, 2, 3, 4))}
ECHO_REQUEST = {4: 8, 6: 128}
ECHO_REPLY = {4: 0, 6: 129}
ICMP_OF = {4: ICMP, 6: ICMPV6}
ND_TYPES = range(133, 138)
MLD_TYPES = frozenset((130, 131, 132, 143))

FRAG_NONE, FRAG_FIRST, FRAG_LATER = 0, 1, 2
ECHO_NONE, ECHO_REQ, ECHO_REP = 0, 1, 2

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


@dataclasses.dataclass(slots=True)
class Parsed:
    """What a frame says. reason set: the frame is decided by parsing alone."""

    reason: R | None = None
    family: int = 0
    saddr: bytes = b""          # the flow judged (for an ICMP error: the quoted flow)
    daddr: bytes = b""
    proto: int = 0
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0
    echo: int = ECHO_NONE
    icmp_error: bool = False
    frag: int = FRAG_NONE
    frag_key: tuple | None = None   # the datagram's own identity, for fragments


def _u16(b: bytes, off: int) -> int:
    return _U16.unpack_from(b, off)[0]


def _walk_ipv6(b: bytes, pos: int, nh: int):
    """Extension headers from pos. Returns (reason, next header, transport
    offset, fragment kind, fragment id); reason None when the walk ends."""
    n, start, count = len(b), pos, 0
    frag, frag_id = FRAG_NONE, 0
    while nh in IPV6_EXT:
        if count == IPV6_MAX_EXT:
            return R.DROP_IPV6_EXT_LIMIT, nh, pos, frag, frag_id
        if pos + 8 > n:      # next-header and length (and a Fragment header's fields) must be there
            return R.DROP_IPV6_EXT_TRUNCATED, nh, pos, frag, frag_id
        if nh == FRAGMENT:
            fo = _u16(b, pos + 2)
            frag_id = _U32.unpack_from(b, pos + 4)[0]
            if fo >> 3:
                return None, b[pos], pos, FRAG_LATER, frag_id
            if fo & 1:
                frag = FRAG_FIRST
            size = 8
        elif nh == AH:
            size = (b[pos + 1] + 2) * 4      # AH counts 4-byte words, minus 2
        else:
            size = (b[pos + 1] + 1) * 8      # others count 8-byte units, minus 1
        nh = b[pos]
        pos += size
        count += 1
        if pos - start > IPV6_EXT_MAX_BYTES:
            return R.DROP_IPV6_EXT_TRUNCATED, nh, pos, frag, frag_id
    if pos > n:
        return R.DROP_IPV6_EXT_TRUNCATED, nh, pos, frag, frag_id
    return None, nh, pos, frag, frag_id


def _echo_id(family: int, proto: int, b: bytes, off: int) -> int | None:
    """The identifier of an echo of this family's ICMP, else None."""
    if proto == ICMP_OF[family] and b[off] in (ECHO_REQUEST[family], ECHO_REPLY[family]):
        return _u16(b, off + 4)
    return None


def _quote(b: bytes, off: int, p: Parsed) -> R | None:
    """The packet an ICMP error quotes, from off: it becomes the flow judged."""
    n = len(b)
    p.icmp_error = True
    p.sport = p.dport = 0
    if p.family == 4:
        if off + 20 > n or b[off] >> 4 != 4:
            return R.DROP_ICMP_TRUNCATED
        ihl = (b[off] & 0xF) * 4
        if ihl < 20 or off + ihl > n:
            return R.DROP_ICMP_TRUNCATED
        p.saddr, p.daddr, p.proto = b[off + 12:off + 16], b[off + 16:off + 20], b[off + 9]
        if _u16(b, off + 6) & 0x1FFF:        # a later fragment: no transport header to read
            return None
        l4 = off + ihl
    else:
        if off + 40 > n or b[off] >> 4 != 6:
            return R.DROP_ICMP_TRUNCATED
        p.saddr, p.daddr = b[off + 8:off + 24], b[off + 24:off + 40]
        reason, nh, l4, frag, _ = _walk_ipv6(b, off + 40, b[off + 6])
        if reason is not None:
            return R.DROP_ICMP_TRUNCATED
        p.proto = nh
        if frag == FRAG_LATER:
            return None
    if p.proto in (TCP, UDP):
        if l4 + 4 > n:
            return R.DROP_ICMP_TRUNCATED
        p.sport, p.dport = _u16(b, l4), _u16(b, l4 + 2)
    elif p.proto in (ICMP, ICMPV6):
        if l4 + 8 > n:
            return R.DROP_ICMP_TRUNCATED
        ident = _echo_id(p.family, p.proto, b, l4)
        if ident is not None:
            p.sport = p.dport = ident
    return None


def _transport(b: bytes, off: int, p: Parsed) -> R | None:
    n = len(b)
    if p.proto == TCP:
        if off + 20 > n:
            return R.DROP_L4_TRUNCATED
        if b[off + 12] >> 4 < 5:
            return R.DROP_TCP_DOFF
        p.sport, p.dport, p.tcp_flags = _u16(b, off), _u16(b, off + 2), b[off + 13]
    elif p.proto == UDP:
        if off + 8 > n:
            return R.DROP_L4_TRUNCATED
        p.sport, p.dport = _u16(b, off), _u16(b, off + 2)
    elif p.proto in (ICMP, ICMPV6):
        if off + 8 > n:
            return R.DROP_L4_TRUNCATED
        if p.proto != ICMP_OF[p.family]:
            return None                      # the other version's ICMP: a plain protocol
        t = b[off]
        if p.family == 6 and (t in ND_TYPES or (t in MLD_TYPES and p.daddr[0] == 0xFF)):
            return R.PASS_ND
        ident = _echo_id(p.family, p.proto, b, off)
        if ident is not None:
            p.sport = p.dport = ident
            p.echo = ECHO_REQ if t == ECHO_REQUEST[p.family] else ECHO_REP
        elif t in ICMP_ERRORS[p.family]:
            return _quote(b, off + 8, p)
    return None


def parse(b: bytes) -> Parsed:
    """Reads one frame (at least an Ethernet header)."""
    n = len(b)
    p = Parsed()
    if n < ETH_HLEN:
        p.reason = R.DROP_L2_TRUNCATED
        return p
    etype, off, tags = _u16(b, 12), ETH_HLEN, 0
    while etype in VLAN_TPIDS:
        if tags == MAX_VLAN_TAGS:
            p.reason = R.DROP_VLAN_DEPTH
            return p
        if off + 4 > n:
            p.reason = R.DROP_L2_TRUNCATED
            return p
        etype, off, tags = _u16(b, off + 2), off + 4, tags + 1
    if etype == ETH_P_ARP:
        p.reason = R.PASS_ARP
        return p
    if etype == ETH_P_IP:
        p.reason = _ipv4(b, off, p)
    elif etype == ETH_P_IPV6:
        p.reason = _ipv6(b, off, p)
    else:
        p.reason = R.PASS_NON_IP
    return p


def _ipv4(b: bytes, off: int, p: Parsed) -> R | None:
    n = len(b)
    if off + 20 > n:
        return R.DROP_L3_TRUNCATED
    if b[off] >> 4 != 4:
        return R.DROP_IP_VERSION
    ihl = (b[off] & 0xF) * 4
    if ihl < 20:
        return R.DROP_IPV4_IHL
    tot = _u16(b, off + 2)
    if tot and (tot < ihl or tot > n - off):
        return R.DROP_IPV4_LENGTH
    if off + ihl > n:
        return R.DROP_L3_TRUNCATED
    p.family, p.proto = 4, b[off + 9]
    p.saddr, p.daddr = b[off + 12:off + 16], b[off + 16:off + 20]
    fo = _u16(b, off + 6)
    if fo & 0x3FFF:
        p.frag = FRAG_LATER if fo & 0x1FFF else FRAG_FIRST
        p.frag_key = (4, p.saddr, p.daddr, _u16(b, off + 4), p.proto)
        if p.frag == FRAG_LATER:
            return None
    return _transport(b, off + ihl, p)


def _ipv6(b: bytes, off: int, p: Parsed) -> R | None:
    n = len(b)
    if off + 40 > n:
        return R.DROP_L3_TRUNCATED
    if b[off] >> 4 != 6:
        return R.DROP_IP_VERSION
    if _u16(b, off + 4) + 40 > n - off:
        return R.DROP_IPV6_LENGTH
    p.family = 6
    p.saddr, p.daddr = b[off + 8:off + 24], b[off + 24:off + 40]
    reason, nh, l4, frag, frag_id = _walk_ipv6(b, off + 40, b[off + 6])
    if reason is not None:
        return reason
    p.proto, p.frag = nh, frag
    if frag != FRAG_NONE:
        # The identification is unique per address pair; later fragments may
        # name a header that only the first carried, so no protocol in the key.
        p.frag_key = (6, p.saddr, p.daddr, frag_id, 0)
    if frag == FRAG_LATER:
        return None
    return _transport(b, l4, p)


@dataclasses.dataclass(slots=True)
class _Flow:
    initiator_is_a: bool
    epoch: int
    first: tuple                # (src, dst, dport, direction) of the packet that admitted it
    closing: bool = False


class RefModel:
    """Shared state of all hooks (conntrack, fragments) and the judgement of
    one parsed frame at one hook."""

    def __init__(self, policy: Model):
        self.epoch = 0
        self.set_policy(policy)
        self.reset()

    def set_policy(self, policy: Model) -> None:
        """A new state goes live and the epoch moves: every tracked flow is
        judged again at its next packet, as its first packet was."""
        self.policy = policy
        self._identity: dict[bytes, int] = {}
        self._decisions: dict[tuple, R] = {}
        self.epoch += 1

    def reset(self) -> None:
        self.ct: dict[tuple, _Flow] = {}
        self.frags: dict[tuple, bool] = {}

    def identity(self, addr: bytes) -> int:
        ident = self._identity.get(addr)
        if ident is None:
            ident = self._identity[addr] = self.policy.identity_of(ipaddress.ip_address(addr))
        return ident

    def decide(self, src: bytes, dst: bytes, proto: int, dport: int, direction: int) -> R:
        """Policy reason for a new flow's first packet src -> dst seen in direction."""
        key = (src, dst, proto, dport, direction)
        reason = self._decisions.get(key)
        if reason is None:
            local, remote = (dst, src) if direction == abi.Direction.INGRESS else (src, dst)
            reason = self._decisions[key] = self.policy.decide(self.identity(local), self.identity(remote),
                                                               direction, proto, dport).reason
        return reason

    def judge(self, p: Parsed, direction: int) -> R:
        """The reason a hook gives the parsed frame; updates the shared tables."""
        if p.reason is not None:
            return p.reason
        if p.frag == FRAG_LATER:
            first_passed = self.frags.get(p.frag_key)
            if first_passed is None:
                return R.DROP_FRAG_NO_FIRST
            return R.PASS_FRAGMENT if first_passed else R.DROP_FRAG_DENIED
        reason = self._judge_flow(p, direction)
        if p.frag == FRAG_FIRST:
            self.frags[p.frag_key] = not reason.is_drop
        return reason

    def _judge_flow(self, p: Parsed, direction: int) -> R:
        src, dst = (p.saddr, p.sport), (p.daddr, p.dport)
        src_is_a = src <= dst
        key = (p.family, p.proto) + ((src, dst) if src_is_a else (dst, src))
        flow = self.ct.get(key)
        if flow and flow.closing and p.proto == TCP and p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
            flow = None                          # a new connection on a closed flow's tuple
        from_initiator = flow is not None and src_is_a == flow.initiator_is_a
        if flow and p.echo and from_initiator != (p.echo == ECHO_REQ):
            flow = None                          # not this exchange's direction: a flow of its own
        if flow:
            rejudged = flow.epoch != self.epoch
            if rejudged:
                # Judged again as its first packet was, in its own direction.
                src0, dst0, dport0, dir0 = flow.first
                if self.decide(src0, dst0, p.proto, dport0, dir0).is_drop:
                    del self.ct[key]
                    return R.DROP_REVOKED
                flow.epoch = self.epoch
            if p.icmp_error:
                return R.PASS_RELATED
            if p.proto == TCP and p.tcp_flags & (TCP_FIN | TCP_RST):
                flow.closing = True
            if rejudged:
                return R.PASS_REJUDGED
            return R.PASS_ESTABLISHED if from_initiator else R.PASS_REPLY
        if p.icmp_error:
            # The quoted packet travelled the other way.
            reason = self.decide(p.saddr, p.daddr, p.proto, p.dport, 1 - direction)
            return R.DROP_ICMP_UNRELATED if reason.is_drop else R.PASS_RELATED
        reason = self.decide(p.saddr, p.daddr, p.proto, p.dport, direction)
        if not reason.is_drop:
            self.ct[key] = _Flow(src_is_a, self.epoch, (p.saddr, p.daddr, p.dport, direction))
        return reason
