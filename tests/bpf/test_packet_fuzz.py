"""Packet fuzzing of all three programs against tests/bpf/refmodel.py.

A seeded generator builds well-formed frames of every shape the datapath
knows (TCP, UDP, ICMP echo and errors quoting allowed and denied flows, GRE,
SCTP, IPv4 options, IPv6 extension chains, fragments, VLAN tags, ARP,
non-IP, replies and FIN/RST of earlier flows) between addresses of a random
ipcache under a random policy, then mutates a share of them (truncation at
every length, IHL, lengths, version, fragment fields, next headers, TCP data
offset, VLAN TPIDs, ICMP types, cut quotes, byte and bit flips). Every frame
runs through XDP ingress, TC ingress and TC egress (in a random order, the
conntrack and fragment tables being shared) and through the reference model:
 - every return code is a defined one, and pass/drop agrees per frame;
 - per batch, the kernel's reason counters (packets and bytes) moved exactly
   as the model's reasons say, and only defined reasons moved;
 - BPF_PROG_TEST_RUN refuses exactly the frames refused_by_test_run names;
 - the draw reaches every branch listed in MIN_REASONS.
In half the batches a changed state goes live part-way through
(tables.apply_state: idle generation, flip, epoch bump), so established
flows are judged again, and kept or revoked, as refmodel says.
On a disagreement the batch is replayed from clean tables one run at a time
to name the first frame that differs. It found two datapath bugs in ICMP
errors, both fixed (see refmodel). DATAPLANE_FUZZ_SEED picks the draw,
DATAPLANE_FUZZ_PACKETS its size (frames; each runs through three programs),
DATAPLANE_FUZZ_CASE=BATCH:INDEX replays one batch up to one frame, tracing it.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import os
import random
import struct
import time

from loader import abi, tables, testrun
from loader.errors import DataplaneError
from loader.model import Model
from tests import reliability
from tests.bpf import refmodel
from tests.bpf.conftest import TC_SHOT, TC_UNSPEC, XDP_DROP, XDP_PASS
from tests.bpf.packets import DIRECTION, HOOKS
from tests.bpf.refmodel import AH, DSTOPTS, FRAGMENT, HOPOPTS, ICMP, ICMPV6, ROUTING, TCP, UDP

R = abi.Reason
SEED = int(os.environ.get("DATAPLANE_FUZZ_SEED", "20261207"))
FRAMES = reliability.size("DATAPLANE_FUZZ_PACKETS", 300_000)   # ~25-35 s here; `make soak`: 1,000,000
CASE = os.environ.get("DATAPLANE_FUZZ_CASE", "")
BATCH = 2000                 # frames per batch: tables cleared, counters compared
BATCHES_PER_WORLD = 5        # a new ipcache and policy after this many batches
SWITCH_SHARE = 0.5           # batches in which a new state goes live part-way (epoch bump)
GRE, SCTP = 47, 132
ICMP_OF = refmodel.ICMP_OF
ECHO_REQUEST, ECHO_REPLY = refmodel.ECHO_REQUEST, refmodel.ECHO_REPLY
ETHERTYPE = {4: 0x0800, 6: 0x86DD}
MACS = bytes.fromhex("020000000002" "020000000001")
MAX_FRAME = 2400             # skb test-runs take at most a page less head- and tailroom (3712 bytes here)
PORTS = (0, 1, 22, 53, 80, 443, 1024, 8080, 65535)

# Passing reasons that need state between frames or a special shape, and the
# drops every parser branch gives: a fuzzer that never reaches one proves
# nothing about it. Scaled with the run size (the figures are per 40,000 frames).
MIN_REASONS = {
    R.PASS_POLICY: 2000, R.PASS_ESTABLISHED: 2000, R.PASS_REPLY: 500, R.PASS_RELATED: 300,
    R.PASS_FRAGMENT: 300, R.PASS_ARP: 300, R.PASS_ND: 300, R.PASS_NON_IP: 300, R.PASS_AUDIT: 500,
    R.DROP_POLICY_DENY: 500, R.DROP_POLICY_DEFAULT: 2000, R.DROP_L2_TRUNCATED: 100, R.DROP_VLAN_DEPTH: 100,
    R.DROP_L3_TRUNCATED: 500, R.DROP_IP_VERSION: 200, R.DROP_IPV4_IHL: 200, R.DROP_IPV4_LENGTH: 200,
    R.DROP_IPV6_LENGTH: 200, R.DROP_IPV6_EXT_LIMIT: 100, R.DROP_IPV6_EXT_TRUNCATED: 200,
    R.DROP_L4_TRUNCATED: 500, R.DROP_TCP_DOFF: 200, R.DROP_FRAG_NO_FIRST: 200, R.DROP_FRAG_DENIED: 100,
    R.DROP_ICMP_UNRELATED: 200, R.DROP_ICMP_TRUNCATED: 200,
    R.PASS_REJUDGED: 40, R.DROP_REVOKED: 10,
}


def refused_by_test_run(hook: str, frame: bytes) -> bool:
    """The frames BPF_PROG_TEST_RUN will not build (measured on this kernel):
    shorter than an Ethernet header at every hook, and at the skb hooks an
    IPv4/IPv6 EtherType (the outer one) followed by less than a fixed IP header."""
    if len(frame) < 14:
        return True
    if hook == "xdp_ingress":
        return False
    etype = frame[12] << 8 | frame[13]
    return (etype == 0x0800 and len(frame) < 14 + 20) or (etype == 0x86DD and len(frame) < 14 + 40)


# --- frame building (struct, no scapy: this runs a million times) ---------------------

def l2(ethertype: int, tpids=()) -> bytes:
    out = MACS + struct.pack("!H", tpids[0] if tpids else ethertype)
    for i, _ in enumerate(tpids):
        inner = tpids[i + 1] if i + 1 < len(tpids) else ethertype
        out += struct.pack("!HH", 100 + i, inner)
    return out


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, ident: int = 0, frag: int = 0,
         options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(payload), ident, frag, 64, proto, 0,
                       src, dst) + options + payload


def ipv6(src: bytes, dst: bytes, nh: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), nh, 64, src, dst) + payload


def ext(kind: int, nh: int, units: int = 0, frag_off: int = 0, more: bool = False, ident: int = 0) -> bytes:
    """An IPv6 extension header: units is its length field (Fragment: fixed 8 bytes)."""
    if kind == FRAGMENT:
        return struct.pack("!BBHI", nh, 0, frag_off << 3 | more, ident)
    if kind == AH:
        return bytes([nh, units]) + bytes((units + 2) * 4 - 2)
    return bytes([nh, units]) + bytes((units + 1) * 8 - 2)


def tcp(sport: int, dport: int, flags: int = 0x02, payload: bytes = b"", opt_words: int = 0) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, (5 + opt_words) << 4, flags, 65535, 0, 0) + \
        b"\x01" * (4 * opt_words) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(type_: int, code: int = 0, ident: int = 0, body: bytes = b"") -> bytes:
    return struct.pack("!BBHHH", type_, code, 0, ident, 1) + body


class Frame:
    """A frame and where its headers are, for the mutations."""

    __slots__ = ("data", "l3", "family", "l4", "proto", "tags")

    def __init__(self, data: bytes, l3: int = 14, family: int = 0, l4: int | None = None, proto: int = 0,
                 tags: int = 0):
        self.data, self.l3, self.family, self.l4, self.proto, self.tags = data, l3, family, l4, proto, tags


def ip_frame(family: int, src: bytes, dst: bytes, proto: int, l4: bytes, tpids=(), chain=(), ident: int = 0,
             frag: int = 0, options: bytes = b"") -> Frame:
    """chain: IPv6 extension headers as (kind, kwargs) pairs, in order."""
    head = l2(ETHERTYPE[family], tpids)
    if family == 4:
        return Frame(head + ipv4(src, dst, proto, l4, ident, frag, options), len(head), 4,
                     len(head) + 20 + len(options), proto, len(tpids))
    exts, nh = b"", proto
    for kind, kw in reversed(chain):
        exts = ext(kind, nh, **kw) + exts
        nh = kind
    return Frame(head + ipv6(src, dst, nh, exts + l4), len(head), 6, len(head) + 40 + len(exts), proto,
                 len(tpids))


# --- a random world: ipcache and policy -----------------------------------------------

class World:
    """One random ipcache and policy, and the addresses frames are drawn from."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        ids = list(range(256, 256 + rng.randint(5, 10))) + [abi.ReservedIdentity.HOST]
        self.identities, self.hosts = {}, {4: [], 6: []}
        for family, bits, base in ((4, 32, 0x0A000000), (6, 128, 0xFD << 120)):
            for _ in range(rng.randint(3, 6)):                       # subnets with hosts inside
                plen = rng.choice((8, 16, 24) if family == 4 else (32, 48, 64))
                net = ipaddress.ip_network((base | rng.getrandbits(bits - 8), plen), strict=False)
                self.identities[str(net)] = rng.choice(ids)
                for _ in range(3):
                    host = int(net.network_address) | rng.getrandbits(bits - plen)
                    self.hosts[family].append(host.to_bytes(bits // 8, "big"))
            for _ in range(rng.randint(6, 12)):                      # hosts of their own
                host = base | rng.getrandbits(bits - 8)
                self.identities[f"{ipaddress.ip_address(host)}/{bits}"] = rng.choice(ids)
                self.hosts[family].append(host.to_bytes(bits // 8, "big"))
        self.by_identity = collections.defaultdict(list)
        model = Model(self.identities, {}, {})
        for family in (4, 6):
            for h in self.hosts[family]:
                self.by_identity[(family, model.identity_of(ipaddress.ip_address(h)))].append(h)
        self.ids = ids
        self.entries = self._entries(ids)
        self.audit_default = rng.random() < 0.2

    def changed(self) -> tuple[list, bool]:
        """Another state over the same ipcache: some rules gone, some actions
        changed, some new rules; now and then the default flips."""
        rng, out = self.rng, []
        for e in self.entries:
            if rng.random() < 0.25:
                continue
            if rng.random() < 0.2:
                e = dataclasses.replace(e, action=rng.choice((abi.Verdict.ALLOW, abi.Verdict.AUDIT, abi.Verdict.DENY)))
            out.append(e)
        added = [dataclasses.replace(e, rule_id=e.rule_id + 1000) for e in self._entries(self.ids)[:rng.randint(0, 20)]]
        keys = {(e.local_id, e.remote_id, e.direction, e.proto) for e in out}
        out += [e for e in added if (e.local_id, e.remote_id, e.direction, e.proto) not in keys]
        audit = (not self.audit_default) if rng.random() < 0.2 else self.audit_default
        return out, audit

    def _entries(self, ids) -> list[tables.PolicyEntry]:
        rng, out, ranges = self.rng, [], collections.Counter()
        world = abi.ReservedIdentity.WORLD
        for rule in range(1, rng.randint(60, 160)):
            local = rng.choice(ids + [world])
            remote = rng.choice(ids + [0, world])
            direction = rng.choice(list(abi.Direction))
            proto = rng.choice((TCP, TCP, UDP, UDP, ICMP, ICMPV6, GRE, SCTP, 0))
            action = rng.choices((abi.Verdict.ALLOW, abi.Verdict.AUDIT, abi.Verdict.DENY), (6, 2, 2))[0]
            kind = "any" if proto == 0 else rng.choice(("exact", "exact", "range", "any"))
            if kind == "exact":
                lo = hi = rng.choice(PORTS[1:] + (rng.randint(1, 65535),))
            elif kind == "range":
                lo = rng.choice((1, 1024, rng.randint(1, 65000)))
                hi = min(65535, lo + rng.choice((1, 100, 5000, 65535)))
                if ranges[(local, remote, direction, proto)] >= abi.MAX_RANGES:
                    continue
                ranges[(local, remote, direction, proto)] += 1
            else:
                lo, hi = tables.ANY_PORT
            out.append(tables.PolicyEntry(local, remote, direction, proto, lo, hi, action, rule))
        return out

    def address(self, family: int, identity: int | None = None) -> bytes:
        rng = self.rng
        if identity is not None and self.by_identity.get((family, identity)) and rng.random() < 0.9:
            return rng.choice(self.by_identity[(family, identity)])
        if rng.random() < 0.8:
            return rng.choice(self.hosts[family])
        return rng.getrandbits(32 if family == 4 else 128).to_bytes(4 if family == 4 else 16, "big")


# --- the generator -------------------------------------------------------------------

class Generator:
    """Seed frames of every shape, then mutations. Remembers recent flows and
    fragmented datagrams so replies, FIN/RST, errors and later fragments of
    earlier frames come up."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.world: World | None = None
        self.flows = collections.deque(maxlen=300)       # (family, src, dst, proto, sport, dport)
        self.datagrams = collections.deque(maxlen=100)   # (family, src, dst, proto, id)
        self.shapes = collections.Counter()
        kinds = [(self.new_flow, 30), (self.reply, 12), (self.close, 5), (self.icmp_error, 8),
                 (self.icmp_any, 5), (self.nd, 3), (self.first_fragment, 6), (self.later_fragment, 9),
                 (self.fragmented_error, 1), (self.v4_options, 4), (self.v6_chain, 7), (self.arp, 2),
                 (self.non_ip, 2), (self.other_proto, 3)]
        self.kinds = [k for k, _ in kinds]
        self.weights = [w for _, w in kinds]

    def frames(self, n: int):
        """n frames: most one per seed, a share as every prefix of one seed."""
        out = []
        while len(out) < n:
            shape = self.rng.choices(self.kinds, self.weights)[0]
            f = shape()
            self.shapes[shape.__name__] += 1
            roll = self.rng.random()
            if roll < 0.004 and len(f.data) <= 400:
                out.extend(f.data[:k] for k in range(14, len(f.data) + 1))
                self.shapes["every_prefix"] += 1
            elif roll < 0.4:
                out.append(self.mutate(f))
            else:
                out.append(f.data)
        assert max(map(len, out)) <= MAX_FRAME
        return out[:n]

    # -- seeds --

    def _tpids(self):
        r = self.rng.random()
        if r < 0.8:
            return ()
        if r < 0.9:
            return (self.rng.choice((0x8100, 0x88A8)),)
        if r < 0.97:
            return (0x88A8, 0x8100)
        return tuple(self.rng.choice((0x8100, 0x88A8)) for _ in range(3))

    def _flow(self):
        """A new flow, half of the time aimed at a policy entry."""
        rng, w = self.rng, self.world
        family = rng.choice((4, 6))
        if rng.random() < 0.6:
            e = rng.choice(w.entries)
            local, remote = w.address(family, e.local_id), w.address(family, e.remote_id or None)
            src, dst = (remote, local) if e.direction == abi.Direction.INGRESS else (local, remote)
            proto = e.proto or rng.choice((TCP, UDP, GRE))
            if proto in (ICMP, ICMPV6) and rng.random() < 0.8:
                proto = ICMP_OF[family]        # else perhaps the other version's ICMP: a plain protocol
            dport = rng.choice([p for p in (e.port_lo, e.port_hi, e.port_lo + 1, e.port_hi - 1, e.port_hi + 1,
                                            rng.randint(e.port_lo, e.port_hi)) if 0 <= p <= 65535])
        else:
            src, dst = w.address(family), w.address(family)
            proto = rng.choice((TCP, TCP, UDP, ICMP_OF[family], GRE, SCTP))
            dport = rng.choice(PORTS) if rng.random() < 0.5 else rng.randint(0, 65535)
        sport = dport if proto in (ICMP, ICMPV6) else rng.randint(1024, 65535)
        return family, src, dst, proto, sport, dport

    def _l4(self, proto: int, sport: int, dport: int, family: int, flags: int = 0x02, reply: bool = False) -> bytes:
        if proto == TCP:
            return tcp(sport, dport, flags, b"x" * self.rng.choice((0, 0, 10)), self.rng.choice((0, 0, 3)))
        if proto == UDP:
            return udp(sport, dport, b"q" * self.rng.choice((0, 12)))
        if proto in (ICMP, ICMPV6):
            types = family if proto == ICMP_OF[family] else self.rng.choice((4, 6))
            return icmp((ECHO_REPLY if reply else ECHO_REQUEST)[types], 0, dport, b"ping")
        return bytes(self.rng.choice((8, 12, 20)))

    def _packet(self, flow, flags=0x02, reply=False, **kw) -> Frame:
        family, src, dst, proto, sport, dport = flow
        return ip_frame(family, src, dst, proto, self._l4(proto, sport, dport, family, flags, reply),
                        tpids=self._tpids(), **kw)

    def new_flow(self) -> Frame:
        flow = self._flow()
        self.flows.append(flow)
        flags = 0x02 if self.rng.random() < 0.85 else self.rng.getrandbits(8)
        return self._packet(flow, flags, reply=self.rng.random() < 0.2)

    def _earlier(self):
        return self.rng.choice(self.flows) if self.flows else self._flow()

    def reply(self) -> Frame:
        family, src, dst, proto, sport, dport = self._earlier()
        rng = self.rng
        if rng.random() < 0.25:      # more of the same flow from its initiator
            return self._packet((family, src, dst, proto, sport, dport), 0x10, reply=rng.random() < 0.2)
        return self._packet((family, dst, src, proto, dport, sport), rng.choice((0x12, 0x10, 0x18)),
                            reply=rng.random() < 0.8)

    def close(self) -> Frame:
        """FIN or RST from either side, or a SYN reusing the tuple."""
        family, src, dst, proto, sport, dport = self._earlier()
        if self.rng.random() < 0.5:
            src, dst, sport, dport = dst, src, dport, sport
        flags = self.rng.choice((0x11, 0x04, 0x14, 0x02, 0x02))
        return ip_frame(family, src, dst, TCP, tcp(sport, dport, flags), tpids=self._tpids())

    def _quoted(self, family: int, flow=None) -> bytes:
        """An IP packet of a flow (an earlier one, or a fresh draw), as an error quotes it."""
        rng = self.rng
        fam, src, dst, proto, sport, dport = flow or (self._earlier() if rng.random() < 0.7 else self._flow())
        if fam != family:
            fam, src, dst, proto, sport, dport = self._flow_of(family)
        l4 = self._l4(proto, sport, dport, family, 0x02)
        r = rng.random()
        if family == 4:
            frag = rng.choice((0x2000 | 3, 7)) if r < 0.1 else 0
            opts = b"\x01" * 4 * rng.randint(1, 4) if r > 0.9 else b""
            return ipv4(src, dst, proto, l4, rng.getrandbits(16), frag, opts)
        nh, chain = proto, b""
        for _ in range(rng.choice((0, 0, 0, 1, 2, 7))):
            kind = rng.choice((HOPOPTS, DSTOPTS, ROUTING, AH, FRAGMENT))
            kw = {"frag_off": rng.choice((0, 0, 5)), "more": True, "ident": 9} if kind == FRAGMENT else {}
            chain, nh = ext(kind, nh, **kw) + chain, kind
        return ipv6(src, dst, nh, chain + l4)

    def _flow_of(self, family: int):
        while True:
            flow = self._flow()
            if flow[0] == family:
                return flow

    def icmp_error(self) -> Frame:
        """An error about an earlier flow: from its responder's side (or a
        router), quoting a packet the flow's initiator sent."""
        rng = self.rng
        flow = self._earlier()
        family, src, dst = flow[0], flow[1], flow[2]
        if rng.random() < 0.3:
            flow = (family, dst, src, flow[3], flow[5], flow[4])
            src, dst = dst, src
        sender = dst if rng.random() < 0.7 else self.world.address(family)
        type_ = rng.choice(sorted(refmodel.ICMP_ERRORS[family]))
        body = self._quoted(family, flow)
        if rng.random() < 0.1:
            body = body[:rng.randint(0, len(body))]
        return ip_frame(family, sender, src, ICMP_OF[family], icmp(type_, rng.randint(0, 5), 0, body),
                        tpids=self._tpids())

    def icmp_any(self) -> Frame:
        """Every type and code, the body a quote or noise; sometimes the other version's ICMP."""
        rng = self.rng
        family = rng.choice((4, 6))
        flow = self._flow_of(family)
        proto = ICMP_OF[family] if rng.random() < 0.8 else ICMP_OF[10 - family]
        body = self._quoted(family) if rng.random() < 0.6 else bytes(rng.getrandbits(8) for _ in range(8))
        return ip_frame(family, flow[1], flow[2], proto, icmp(rng.randint(0, 255), rng.randint(0, 255),
                                                              rng.randint(0, 65535), body), tpids=self._tpids())

    def nd(self) -> Frame:
        rng = self.rng
        src = self.world.address(6)
        dst = bytes.fromhex("ff02" + "00" * 13 + "16") if rng.random() < 0.5 else self.world.address(6)
        chain = ((HOPOPTS, {}),) if rng.random() < 0.5 else ()
        return ip_frame(6, src, dst, ICMPV6, icmp(rng.choice((130, 131, 132, 133, 134, 135, 136, 137, 143))),
                        chain=chain)

    def first_fragment(self) -> Frame:
        rng = self.rng
        flow = self._flow()
        while flow[3] not in (TCP, UDP):
            flow = self._flow()
        family, src, dst, proto, sport, dport = flow
        self.flows.append(flow)
        ident = rng.getrandbits(16 if family == 4 else 32)
        self.datagrams.append((family, src, dst, proto, ident))
        l4 = self._l4(proto, sport, dport, family) + bytes(16)
        if family == 4:
            return ip_frame(4, src, dst, proto, l4, tpids=self._tpids(), ident=ident, frag=0x2000)
        before = [(rng.choice((HOPOPTS, DSTOPTS)), {})] * rng.randint(0, 2)
        after = [(DSTOPTS, {})] * rng.randint(0, 1)
        return ip_frame(6, src, dst, proto, l4, chain=before + [(FRAGMENT, {"more": True, "ident": ident})] + after)

    def later_fragment(self) -> Frame:
        rng = self.rng
        if self.datagrams and rng.random() < 0.85:
            family, src, dst, proto, ident = rng.choice(self.datagrams)
        else:
            family, src, dst, proto = self._flow()[:4]
            ident = rng.getrandbits(16)
        body = bytes(range(24))
        offset = rng.randint(1, 200)
        more = rng.random() < 0.5
        if family == 4:
            return ip_frame(4, src, dst, proto, body, tpids=self._tpids(), ident=ident, frag=more << 13 | offset)
        nh = proto if rng.random() < 0.8 else rng.choice((DSTOPTS, AH))
        before = [(HOPOPTS, {})] * rng.randint(0, 1)
        return ip_frame(6, src, dst, nh, body,
                        chain=before + [(FRAGMENT, {"frag_off": offset, "more": more, "ident": ident})])

    def fragmented_error(self) -> Frame:
        """The first fragment of an ICMP error (its later fragments come from later_fragment)."""
        rng = self.rng
        f = self.icmp_error()
        ident = rng.getrandbits(16)
        data = bytearray(f.data)
        if f.family == 4:
            struct.pack_into("!HH", data, f.l3 + 4, ident, 0x2000)
            src, dst = bytes(data[f.l3 + 12:f.l3 + 16]), bytes(data[f.l3 + 16:f.l3 + 20])
            self.datagrams.append((4, src, dst, ICMP, ident))
            return Frame(bytes(data), f.l3, 4, f.l4, ICMP, f.tags)
        src, dst = bytes(data[f.l3 + 8:f.l3 + 24]), bytes(data[f.l3 + 24:f.l3 + 40])
        payload = bytes(data[f.l4:])
        self.datagrams.append((6, src, dst, ICMPV6, ident))
        return ip_frame(6, src, dst, ICMPV6, payload, chain=[(FRAGMENT, {"more": True, "ident": ident})])

    def v4_options(self) -> Frame:
        flow = self._flow_of(4)
        self.flows.append(flow)
        return self._packet(flow, options=b"\x01" * 4 * self.rng.randint(1, 10))

    def v6_chain(self) -> Frame:
        """Chains of every kind and length, past the walk limit and past 1024 bytes."""
        rng = self.rng
        flow = self._flow_of(6)
        self.flows.append(flow)
        chain, size = [], 0
        for _ in range(rng.choice((1, 2, 3, 5, 6, 6, 7, 8))):
            kind = rng.choice((HOPOPTS, DSTOPTS, ROUTING, AH, FRAGMENT))
            if kind == FRAGMENT:
                chain.append((kind, {"more": rng.random() < 0.3, "ident": rng.getrandbits(32)}))
            else:
                units = rng.choice((0, 0, 1, 2, 5, 30, 127, 130) if size < 900 else (0, 1))
                size += (units + 1) * 8
                chain.append((kind, {"units": units}))
        return self._packet(flow, chain=chain)

    def arp(self) -> Frame:
        return Frame(l2(0x0806, self._tpids()) + bytes(28))

    def non_ip(self) -> Frame:
        etype = self.rng.choice((0x88CC, 0x8847, 0x88B5, 0x0600, 0x05DC, 0x0042, self.rng.getrandbits(16)))
        return Frame(l2(etype, self._tpids()) + bytes(self.rng.choice((0, 20, 46))))

    def other_proto(self) -> Frame:
        family = self.rng.choice((4, 6))
        flow = self._flow_of(family)
        proto = self.rng.choice((GRE, SCTP, self.rng.randint(0, 255)))
        return ip_frame(family, flow[1], flow[2], proto, bytes(self.rng.choice((0, 4, 12))), tpids=self._tpids())

    # -- mutations --

    def mutate(self, f: Frame) -> bytes:
        rng = self.rng
        data = bytearray(f.data)
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            m = rng.randrange(14)
            l3, l4 = f.l3, f.l4
            if m == 0:                                        # truncate anywhere
                del data[rng.randint(0, len(data)):]
            elif m == 1 and f.family == 4 and len(data) > l3:  # IHL
                data[l3] = (data[l3] & 0xF0) | rng.randint(0, 15)
            elif m == 2 and f.family and len(data) > l3 + 6:   # total / payload length
                where = l3 + (2 if f.family == 4 else 4)
                exact = len(data) - l3 - (0 if f.family == 4 else 40)
                value = rng.choice((0, rng.randint(0, 4 * (data[l3] & 0xF) + 1), exact + rng.randint(-3, 2),
                                    exact + rng.randint(1, 40), rng.getrandbits(16)))
                struct.pack_into("!H", data, where, max(0, min(0xFFFF, value)))
            elif m == 3 and f.family and len(data) > l3:        # version nibble
                data[l3] = (rng.randint(0, 15) << 4) | (data[l3] & 0xF)
            elif m == 4 and f.family == 4 and len(data) > l3 + 8:  # fragment offset and flags
                struct.pack_into("!H", data, l3 + 6, rng.choice((0x2000, rng.getrandbits(16), rng.randint(1, 9))))
            elif m == 5 and f.family and len(data) > l3 + 9:     # protocol / next header
                data[l3 + (9 if f.family == 4 else 6)] = rng.choice(
                    (HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS, TCP, UDP, ICMP, ICMPV6, rng.randint(0, 255)))
            elif m == 6 and f.proto == TCP and l4 is not None and len(data) > l4 + 12:  # data offset
                data[l4 + 12] = rng.randint(0, 15) << 4
            elif m == 7 and f.tags and len(data) >= 18:        # VLAN TPIDs
                where = rng.choice([12 + 4 * i for i in range(f.tags + 1) if 14 + 4 * i <= len(data)])
                struct.pack_into("!H", data, where, rng.choice((0x8100, 0x88A8, 0x0800, 0x86DD, 0x0806,
                                                                rng.getrandbits(16))))
            elif m == 8 and f.proto in (ICMP, ICMPV6) and l4 is not None and len(data) > l4 + 1:  # ICMP type
                data[l4], data[l4 + 1] = rng.randint(0, 255), rng.randint(0, 255)
            elif m == 9 and f.proto in (ICMP, ICMPV6) and l4 is not None:  # quote cut short
                del data[min(len(data), l4 + 8 + rng.randint(0, 48)):]
                self._fit_length(f, data)
            elif m == 10 and data:                                # byte flips in the headers
                for _ in range(rng.randint(1, 3)):
                    i = rng.randrange(min(len(data), (l4 or 60) + 24))
                    data[i] = rng.getrandbits(8)
            elif m == 11 and data:                                # bit flips anywhere
                for _ in range(rng.randint(1, 4)):
                    i = rng.randrange(len(data))
                    data[i] ^= 1 << rng.randrange(8)
            elif m == 12 and l4 is not None:                      # transport header cut short
                del data[min(len(data), l4 + rng.randint(0, 19)):]
                self._fit_length(f, data)
            elif m == 13 and f.proto == TCP and l4 is not None and len(data) > l4 + 12:  # data offset, low
                data[l4 + 12] = rng.randint(0, 5) << 4
            if len(data) < 14 and rng.random() < 0.9:           # keep most frames runnable
                data = bytearray(f.data[:14 + rng.randint(0, 6)])
        return bytes(data)


    def _fit_length(self, f: Frame, data: bytearray) -> None:
        """Most of the time, make the IP length agree with a cut frame, so
        the cut is seen by the layer it falls in and not as a length error."""
        if self.rng.random() < 0.8 and len(data) >= f.l3 + (20 if f.family == 4 else 40):
            if f.family == 4:
                struct.pack_into("!H", data, f.l3 + 2, len(data) - f.l3)
            elif f.family == 6:
                struct.pack_into("!H", data, f.l3 + 4, len(data) - f.l3 - 40)


# --- running ----------------------------------------------------------------------------

def passes(hook: str, retval: int) -> bool:
    if hook == "xdp_ingress":
        assert retval in (XDP_PASS, XDP_DROP), f"{hook}: undefined return code {retval}"
        return retval == XDP_PASS
    assert retval in (TC_UNSPEC, TC_SHOT), f"{hook}: undefined return code {retval}"
    return retval == TC_UNSPEC


class Run:
    """One fuzzing session: the datapath, the model, the tallies."""

    def __init__(self, dp, seed: int):
        self.dp, self.seed = dp, seed
        self.rng = random.Random(seed)
        self.gen = Generator(self.rng)
        self.model: refmodel.RefModel | None = None
        self.reasons = collections.Counter()
        self.frames = self.runs = self.refused = 0
        self.false_pass = self.false_drop = 0
        self.switches = 0
        self.fds = dict(dp.prog_fds)

    def new_world(self) -> None:
        w = self.gen.world = World(self.rng)
        tables.sync_identities(self.dp, w.identities)
        tables.sync_policy(self.dp, w.entries)
        self.dp.set_config(audit_default=w.audit_default)
        live = Model.from_datapath(self.dp)
        ref = Model.from_entries(w.identities, w.entries, audit_default=w.audit_default)
        assert (live.policy, live.range_sets, live.audit_default) == (ref.policy, ref.range_sets, ref.audit_default)
        self.model = refmodel.RefModel(ref)

    def draw(self, n: int) -> list[tuple]:
        """A batch: the state it starts from, then n frames each with its hook
        order; in half the batches a new state goes live (epoch bump) at a
        random point, as a (None, state) item."""
        w = self.gen.world
        items: list[tuple] = [(None, (w.entries, w.audit_default))]
        frames = self.gen.frames(n)
        items += [(f, tuple(self.rng.sample(HOOKS, 3))) for f in frames]
        if self.rng.random() < SWITCH_SHARE:
            w.entries, w.audit_default = w.changed()
            items.insert(self.rng.randint(2, len(items)), (None, (w.entries, w.audit_default)))
        return items

    def go_live(self, state) -> None:
        """Applies a state the way the agent does (idle generation, flip,
        epoch bump) and tells the model."""
        entries, audit = state
        w = self.gen.world
        tables.apply_state(self.dp, w.identities, entries, audit_default=audit)
        self.model.set_policy(Model.from_entries(w.identities, entries, audit_default=audit))

    def clear(self) -> None:
        self.dp.maps["ct"].clear()
        self.dp.maps["frag"].clear()
        self.model.reset()

    def one(self, hook: str, frame: bytes, parsed) -> tuple[bool | None, R | None]:
        """(kernel passed, model reason); (None, None) when test-run refused the frame."""
        refuse = refused_by_test_run(hook, frame)
        try:
            r = testrun.test_run(self.fds[hook], frame)
        except DataplaneError as e:
            assert refuse, f"{hook}: test-run refused a frame it should run ({e}): {frame.hex()}"
            return None, None
        assert not refuse, f"{hook}: test-run ran a frame it should refuse: {frame.hex()}"
        return passes(hook, r.retval), self.model.judge(parsed, DIRECTION[hook])

    def batch(self, items) -> list[str]:
        """Runs a batch from clean tables; returns its disagreements (empty: none)."""
        self.clear()
        before = self.dp.reason_counters()
        want = collections.Counter()
        wrong = []
        for i, (frame, order) in enumerate(items):
            if frame is None:
                self.go_live(order)
                self.switches += i > 0
                continue
            parsed = refmodel.parse(frame)
            for hook in order:
                kernel, reason = self.one(hook, frame, parsed)
                if kernel is None:
                    self.refused += 1
                    continue
                self.runs += 1
                want[reason] += 1
                want[(reason, "bytes")] += len(frame)
                if kernel == reason.is_drop:
                    if kernel:
                        self.false_pass += 1
                    else:
                        self.false_drop += 1
                    wrong.append(f"frame {i} at {hook}: kernel {'passes' if kernel else 'drops'}, "
                                 f"model {reason.name}")
        self.frames += sum(1 for frame, _ in items if frame is not None)
        delta = {}
        for reason, (pk, by) in self.dp.reason_counters().items():
            b = before.get(reason, (0, 0))
            if (pk, by) != b:
                delta[reason] = (pk - b[0], by - b[1])
        undefined = [r for r in delta if not isinstance(r, abi.Reason)]
        if undefined:
            wrong.append(f"undefined reasons counted: {undefined}")
        model = {r: (want[r], want[(r, "bytes")]) for r in want if isinstance(r, abi.Reason)}
        if delta != model:
            wrong.append(f"reason counters moved {_names(delta)}, model says {_names(model)}")
        for r, (pk, _) in model.items():
            self.reasons[r] += pk
        return wrong

    def replay(self, items, upto: int | None = None, trace: bool = False) -> tuple[int, str] | None:
        """Runs the batch again one run at a time, reading which reason the
        kernel counted; returns the index and a description of the first difference."""
        self.clear()
        for i, (frame, order) in enumerate(items[:None if upto is None else upto + 1]):
            if frame is None:
                self.go_live(order)
                continue
            parsed = refmodel.parse(frame)
            for hook in order:
                before = self.dp.reason_counters()
                kernel, reason = self.one(hook, frame, parsed)
                if kernel is None:
                    continue
                delta = [r for r, v in self.dp.reason_counters().items() if v != before.get(r)]
                got = delta[0] if len(delta) == 1 else delta
                line = (f"frame {i} at {hook}: kernel {'pass' if kernel else 'drop'} reason "
                        f"{getattr(got, 'name', got)}, model {reason.name}\n  frame {frame.hex()}")
                if trace:
                    print(line)
                if got != reason or kernel == reason.is_drop:
                    return i, line
        return None


def _names(d: dict) -> dict:
    return {getattr(r, "name", r): v for r, v in sorted(d.items(), key=lambda kv: int(kv[0]))}


def test_packet_fuzz(dp):
    run = Run(dp, SEED)
    if CASE:
        _replay_case(run, CASE)
        return
    started = time.monotonic()
    batches = (FRAMES + BATCH - 1) // BATCH
    for b in range(batches):
        if b % BATCHES_PER_WORLD == 0:
            run.new_world()
        items = run.draw(min(BATCH, FRAMES - b * BATCH))
        wrong = run.batch(items)
        if wrong:
            first = run.replay(items)
            index, line = first or ("", "none when replayed one by one")
            raise AssertionError(
                f"seed {SEED} batch {b}: kernel and model disagree ({len(wrong)} findings; so far "
                f"{run.false_pass} runs the model drops passed, {run.false_drop} it passes dropped):\n  "
                + "\n  ".join(wrong[:8]) + f"\nfirst differing run: {line}\nreplay: DATAPLANE_FUZZ_SEED={SEED} "
                f"DATAPLANE_FUZZ_PACKETS={FRAMES} DATAPLANE_FUZZ_CASE={b}:{index}")
    duration = time.monotonic() - started

    reliability.record("packet_fuzz", {
        "frames": run.frames, "runs": run.runs, "refused_by_test_run": run.refused,
        "states_applied_mid_batch": run.switches, "rejudged_kept": run.reasons[R.PASS_REJUDGED],
        "revoked": run.reasons[R.DROP_REVOKED],
        "reasons": {r.name: n for r, n in sorted(run.reasons.items())},
        "mismatches": 0, "false_passes": run.false_pass, "false_drops": run.false_drop, "seed": SEED,
        "duration_s": round(duration, 1), "frames_per_s": round(run.frames / duration),
        "shapes": dict(sorted(run.gen.shapes.items())),
    })
    assert run.runs + run.refused == 3 * run.frames
    scale = run.frames / 40_000
    short = {r.name: (run.reasons[r], int(n * scale)) for r, n in MIN_REASONS.items() if run.reasons[r] < n * scale}
    assert not short, f"seed {SEED}: reasons reached too rarely (got, wanted): {short}"
    assert run.refused > 0, "no frame exercised the test-run refusal rule"


def _replay_case(run: Run, case: str) -> None:
    """DATAPLANE_FUZZ_CASE=BATCH:INDEX: draws the same batches, replays one up to a frame."""
    b, _, index = case.partition(":")
    b, index = int(b), int(index) if index else None
    for i in range(b + 1):
        if i % BATCHES_PER_WORLD == 0:
            run.new_world()
        items = run.draw(min(BATCH, FRAMES - i * BATCH))
    first = run.replay(items, index, trace=True)
    assert first is None, f"seed {SEED} case {case}: {first[1]}"
