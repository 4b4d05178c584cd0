"""Python mirror of bpf/include/dp_abi.h: enums, constants and struct layouts.

tests/bpf/test_abi.py compares every struct here with the BTF the compiler
emits for the C header (size and each field's offset) and every enum with the
C enum, so the two cannot drift apart silently.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket

ABI_VERSION = 3
MAX_PLENS = 40
MAX_RANGES = 16
REASON_MAX = 64
STAT_MAX = 16

GEN_AUDIT_DEFAULT = 1 << 0

CT_INIT_IS_A = 1 << 0
CT_INIT_EGRESS = 1 << 1
CT_CLOSING = 1 << 2
CT_SEEN_REPLY = 1 << 3


class ReservedIdentity(enum.IntEnum):
    ANY = 0
    HOST = 1
    WORLD = 2
    CONTROLLER = 3      # a controller's address in an agent's bootstrap state (dataplane/fleet_agent.py)
    FIRST_ALLOCATED = 256


class Verdict(enum.IntEnum):
    """Numbered in order of precedence: combining matches takes the maximum."""

    NONE = 0
    ALLOW = 1
    AUDIT = 2
    DENY = 3


class Reason(enum.IntEnum):
    NONE = 0
    PASS_POLICY = 1
    PASS_ESTABLISHED = 2
    PASS_REPLY = 3
    PASS_RELATED = 4
    PASS_FRAGMENT = 5
    PASS_ARP = 6
    PASS_ND = 7
    PASS_NON_IP = 8
    PASS_AUDIT = 9
    PASS_REJUDGED = 10
    DROP_POLICY_DENY = 32
    DROP_POLICY_DEFAULT = 33
    DROP_REVOKED = 34
    DROP_L2_TRUNCATED = 35
    DROP_VLAN_DEPTH = 36
    DROP_L3_TRUNCATED = 37
    DROP_IP_VERSION = 38
    DROP_IPV4_IHL = 39
    DROP_IPV4_LENGTH = 40
    DROP_IPV6_LENGTH = 41
    DROP_IPV6_EXT_LIMIT = 42
    DROP_IPV6_EXT_TRUNCATED = 43
    DROP_L4_TRUNCATED = 44
    DROP_TCP_DOFF = 45
    DROP_FRAG_NO_FIRST = 46
    DROP_FRAG_DENIED = 47
    DROP_ICMP_UNRELATED = 48
    DROP_ICMP_TRUNCATED = 49
    DROP_NON_IP = 50

    @property
    def is_drop(self) -> bool:
        return self.value >= REASON_FIRST_DROP

    @property
    def label(self) -> str:
        """Lower-case name without the PASS_/DROP_ prefix (metrics, CLI)."""
        return self.name.split("_", 1)[1].lower() if self.value else "none"


REASON_FIRST_DROP = 32


class Direction(enum.IntEnum):
    INGRESS = 0
    EGRESS = 1


class Hook(enum.IntEnum):
    XDP_INGRESS = 0
    TC_INGRESS = 1
    TC_EGRESS = 2


class Family(enum.IntEnum):
    IPV4 = 4
    IPV6 = 6


class Stat(enum.IntEnum):
    EVENTS_LOST = 0
    EVENTS_SAMPLED_OUT = 1
    CT_CREATED = 2
    CT_REJUDGED = 3
    CT_EXPIRED = 4
    CT_INSERT_FAILED = 5
    FRAG_TRACKED = 6


# Enums the layout test checks against the C header, by C enum name.
C_ENUMS = {
    "dp_reserved_identity": (ReservedIdentity, "DP_ID_"),
    "dp_verdict": (Verdict, "DP_VERDICT_"),
    "dp_reason": (Reason, "DP_"),
    "dp_direction": (Direction, "DP_DIR_"),
    "dp_hook": (Hook, "DP_HOOK_"),
    "dp_family": (Family, "DP_FAMILY_"),
    "dp_stat": (Stat, "DP_STAT_"),
}

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
Addr = u32 * 4  # __be32[4]: raw network-order bytes


class _Struct(ctypes.Structure):
    def to_bytes(self) -> bytes:
        return bytes(self)

    @classmethod
    def from_bytes(cls, data: bytes):
        return cls.from_buffer_copy(data)

    def __eq__(self, other):
        return type(self) is type(other) and bytes(self) == bytes(other)

    def __hash__(self):
        return hash(bytes(self))

    def __repr__(self):
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n, *_ in self._fields_ if not n.startswith("pad"))
        return f"{type(self).__name__}({fields})"


class IpKey(_Struct):
    _fields_ = [("prefixlen", u32), ("family", u8), ("gen", u8), ("pad", u8 * 2), ("addr", Addr)]


class IpVal(_Struct):
    _fields_ = [("identity", u32), ("expires_s", u32)]


class Plen(_Struct):
    _fields_ = [("prefixlen", u32), ("mask", Addr)]


class Plens(_Struct):
    _fields_ = [("count", u32), ("e", Plen * MAX_PLENS)]


class PolicyKey(_Struct):
    _fields_ = [("local_id", u32), ("remote_id", u32), ("dport", u16), ("proto", u8), ("dir", u8),
                ("gen", u8), ("pad", u8 * 3)]


class PolicyVal(_Struct):
    _fields_ = [("rule_id", u32), ("action", u8), ("pad", u8), ("ranges", u16)]


class PortRange(_Struct):
    _fields_ = [("lo", u16), ("hi", u16), ("rule_id", u32), ("action", u8), ("pad", u8 * 3)]


class RangeSet(_Struct):
    _fields_ = [("count", u32), ("r", PortRange * MAX_RANGES)]


class CtKey(_Struct):
    _fields_ = [("addr_a", Addr), ("addr_b", Addr), ("port_a", u16), ("port_b", u16),
                ("proto", u8), ("family", u8), ("pad", u8 * 2)]


class CtVal(_Struct):
    _fields_ = [("last_seen_ns", u64), ("epoch", u32), ("rule_id", u32), ("local_id", u32),
                ("remote_id", u32), ("verdict", u8), ("flags", u8), ("pad", u8 * 2), ("expires_s", u32)]


class FragKey(_Struct):
    _fields_ = [("saddr", Addr), ("daddr", Addr), ("id", u32), ("proto", u8), ("family", u8),
                ("pad", u8 * 2)]


class FragVal(_Struct):
    _fields_ = [("created_ns", u64), ("rule_id", u32), ("local_id", u32), ("remote_id", u32),
                ("sport", u16), ("dport", u16), ("verdict", u8), ("proto", u8), ("pad", u8 * 6)]


class Gen(_Struct):
    _fields_ = [("active", u32), ("flags", u32)]


class Config(_Struct):
    _fields_ = [("epoch", u32), ("flags", u32), ("allow_sample", u32), ("pad", u32)]


class Counter(_Struct):
    _fields_ = [("packets", u64), ("bytes", u64)]


class RuleCounter(_Struct):
    _fields_ = [("dir", Counter * 2)]


class Event(_Struct):
    _fields_ = [("ts_ns", u64), ("saddr", Addr), ("daddr", Addr), ("sport", u16), ("dport", u16),
                ("proto", u8), ("family", u8), ("dir", u8), ("verdict", u8), ("reason", u8),
                ("hook", u8), ("pad", u16), ("rule_id", u32), ("local_id", u32),
                ("remote_id", u32), ("ifindex", u32), ("pkt_len", u32), ("pad2", u32)]


# C struct name -> Python mirror, for the layout test.
C_STRUCTS = {
    "dp_ip_key": IpKey, "dp_ip_val": IpVal, "dp_plen": Plen, "dp_plens": Plens,
    "dp_policy_key": PolicyKey, "dp_policy_val": PolicyVal, "dp_port_range": PortRange,
    "dp_range_set": RangeSet, "dp_ct_key": CtKey, "dp_ct_val": CtVal, "dp_frag_key": FragKey,
    "dp_frag_val": FragVal, "dp_gen": Gen, "dp_config": Config, "dp_counter": Counter, "dp_rule_counter": RuleCounter,
    "dp_event": Event,
}


# --- address and port codecs ---------------------------------------------

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def family_of(ip: IpAddress | IpNetwork) -> Family:
    return Family.IPV4 if ip.version == 4 else Family.IPV6


def addr_to_c(ip: IpAddress) -> Addr:
    """Network-order address into a zero-padded __be32[4]."""
    return Addr.from_buffer_copy(ip.packed.ljust(16, b"\0"))


def addr_from_c(family: int, raw) -> IpAddress:
    data = bytes(raw)
    return ipaddress.ip_address(data[:4] if family == Family.IPV4 else data)


def htons(port: int) -> int:
    return socket.htons(port)


def ntohs(port: int) -> int:
    return socket.ntohs(port)


def mask_words(family: int, prefixlen: int) -> Addr:
    bits = 32 if family == Family.IPV4 else 128
    mask = ((1 << bits) - 1) ^ ((1 << (bits - prefixlen)) - 1)
    return Addr.from_buffer_copy(mask.to_bytes(bits // 8, "big").ljust(16, b"\0"))


def ip_key(net: IpNetwork, lpm: bool = False, gen: int = 0) -> IpKey:
    """Key of a prefix in one generation: hash mode stores the prefix length,
    LPM mode adds the 32 bits of family, generation and padding that precede
    the address."""
    family = family_of(net)
    return IpKey(prefixlen=net.prefixlen + (32 if lpm else 0), family=family, gen=gen,
                 addr=addr_to_c(net.network_address))


def ip_key_network(key: IpKey, lpm: bool = False) -> IpNetwork:
    plen = key.prefixlen - (32 if lpm else 0)
    return ipaddress.ip_network((addr_from_c(key.family, key.addr), plen))
