#!/usr/bin/env python3
"""Nanoseconds per packet of the XDP enforcement program, next to the bare
costs it is built from, measured with BPF_PROG_TEST_RUN on random keys.

    .venv/bin/python bench/datapath_ns.py            # full run (a few minutes)
    .venv/bin/python bench/datapath_ns.py --quick    # smoke run

Figures (bench/README.md explains each one's method):
  empty XDP program; the same plus the benchmark's random-key generation;
  one hash lookup of a random key (u32 key, and the conntrack key in a
  hash like dp_ct_v3); dp_xdp_ingress on an established flow, a new allowed
  flow and a denied flow, with the identity map as per-prefix-length hashes
  (the default) and as an LPM trie, each at every --sizes entry count.

Every enforcement configuration is its own datapath instance, compiled with
-DDP_BENCH_KEYS=N (bpf/lib/bench.h) so that each run parses the same frame
and then judges a random one of N sources, and unloaded afterwards even when
something failed. All of them are built from one copy of bpf/ taken at the
start, so a run measures one version of the sources. Results go to bench/results/datapath_ns.json (the --quick
run to datapath_ns.quick.json) and a markdown table to stdout; progress to
stderr. Needs root, bpffs and kernel headers (`make setup`).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loader import abi, libbpf, tables, testrun  # noqa: E402
from loader.compile import BPF_DIR, BuildOptions, kernel_headers_present  # noqa: E402
from loader.instance import Datapath, check_bpffs, check_privileges  # noqa: E402
from loader.maps import Map  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"

# --- the synthetic node -----------------------------------------------------------

BENCH_BASE = 0x0A000000                  # 10.0.0.0: sources are BENCH_BASE + random(N)
LOCAL_ADDR = ipaddress.IPv4Address("192.168.1.10")   # destination = local endpoint (ingress)
LOCAL_ID = 256                           # identity of the local endpoint
REMOTE_ID0 = 65536                       # identity of source BENCH_BASE + i is REMOTE_ID0 + i
CIDRS = {                                # a few prefixes next to the N hosts
    "10.0.0.0/8": 300,
    "100.64.0.0/10": 301,
    "172.16.0.0/12": 302,
    "192.168.0.0/16": 303,
    "203.0.113.0/24": 304,
}
RULES = 1000                             # policy entry i names rule 1 + i % RULES
SPORT = 40000                            # source port when it is not randomized
DPORT_ALLOWED = 80                       # policy entries allow TCP to this port
DPORT_DENIED = 81                        # no entry mentions this port: default deny
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
CT_SLACK = 4096                          # conntrack headroom: inserts must never find the table full
TABLE_SLACK = 64                         # ipcache/policy headroom over N (local endpoint, CIDRs)

CLOCK_MONOTONIC_COARSE = getattr(time, "CLOCK_MONOTONIC_COARSE", 6)   # Linux clock id; Python does not name it
U32 = struct.Struct("=I")                # host-order u32 field
BE32 = struct.Struct("!I")               # network-order address word


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- frames -----------------------------------------------------------------------

def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tcp_frame(src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, sport: int, dport: int,
              flags: int) -> bytes:
    """Ethernet + IPv4 (DF, no options) + TCP (no options), padded to the 60-byte minimum."""
    eth = bytes.fromhex("020000000002" "020000000001") + struct.pack("!H", 0x0800)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0 if not flags & TCP_ACK else 1, 5 << 4, flags,
                      65535, 0, 0)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP,
                               0, src.packed, dst.packed))
    struct.pack_into("!H", ip, 10, _csum(bytes(ip)))
    return (eth + bytes(ip) + tcp).ljust(60, b"\0")


def source(i: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(BENCH_BASE + i)


# --- map contents, built once per size as raw key/value bytes ----------------------

def _patch(template: bytes, offset: int, packed: bytes) -> bytes:
    return template[:offset] + packed + template[offset + len(packed):]


def ct_key(src: ipaddress.IPv4Address, sport: int, dst: ipaddress.IPv4Address, dport: int,
           proto: int) -> tuple[abi.CtKey, bool]:
    """The conntrack key dp_ct_key_of builds: endpoints in canonical order,
    (address bytes, then port in host order) smaller first. Returns the key
    and whether the packet's source is side a."""
    src_is_a = (src.packed.ljust(16, b"\0"), sport) <= (dst.packed.ljust(16, b"\0"), dport)
    (a, pa), (b, pb) = ((src, sport), (dst, dport)) if src_is_a else ((dst, dport), (src, sport))
    key = abi.CtKey(addr_a=abi.addr_to_c(a), addr_b=abi.addr_to_c(b), port_a=abi.htons(pa),
                    port_b=abi.htons(pb), proto=proto, family=abi.Family.IPV4)
    return key, src_is_a


class Contents:
    """Key/value bytes for one size N: N host identities, N policy entries,
    N established conntrack entries. Built lazily and kept for every
    configuration of that size."""

    def __init__(self, n: int):
        self.n = n
        self._cache: dict = {}

    def _get(self, name, build):
        if name not in self._cache:
            t = time.monotonic()
            self._cache[name] = build()
            log(f"  built {name} contents for N={self.n} in {time.monotonic() - t:.1f} s")
        return self._cache[name]

    def hosts(self, lpm: bool) -> list[tuple[bytes, bytes]]:
        """ipcache: source i as a /32 with identity REMOTE_ID0 + i."""
        def build():
            tk = bytes(abi.ip_key(ipaddress.ip_network(source(0)), lpm))
            off = abi.IpKey.addr.offset
            tv = bytes(abi.IpVal(identity=0))
            voff = abi.IpVal.identity.offset
            return [(_patch(tk, off, BE32.pack(BENCH_BASE + i)), _patch(tv, voff, U32.pack(REMOTE_ID0 + i)))
                    for i in range(self.n)]
        return self._get(f"ipcache-{'lpm' if lpm else 'hash'}", build)

    def policy(self) -> list[tuple[bytes, bytes]]:
        """policy: (local, remote i, TCP, port DPORT_ALLOWED, ingress) -> allow, rule 1 + i % RULES."""
        def build():
            tk = bytes(abi.PolicyKey(local_id=LOCAL_ID, remote_id=0, dport=DPORT_ALLOWED, proto=socket.IPPROTO_TCP,
                                     dir=abi.Direction.INGRESS))
            koff = abi.PolicyKey.remote_id.offset
            tv = bytes(abi.PolicyVal(rule_id=0, action=abi.Verdict.ALLOW, ranges=0))
            voff = abi.PolicyVal.rule_id.offset
            return [(_patch(tk, koff, U32.pack(REMOTE_ID0 + i)), _patch(tv, voff, U32.pack(1 + i % RULES)))
                    for i in range(self.n)]
        return self._get("policy", build)

    def flows(self, epoch: int) -> list[tuple[bytes, bytes]]:
        """conntrack: one admitted flow per source, source:SPORT -> local:DPORT_ALLOWED, TCP,
        judged ingress at the current epoch, answered (so the TCP timeout, not the
        opening one, applies), last seen now (CLOCK_MONOTONIC_COARSE, the clock of
        bpf_ktime_get_coarse_ns)."""
        def build():
            key0, src_is_a = ct_key(source(0), SPORT, LOCAL_ADDR, DPORT_ALLOWED, socket.IPPROTO_TCP)
            _, last_is_a = ct_key(source(self.n - 1), SPORT, LOCAL_ADDR, DPORT_ALLOWED, socket.IPPROTO_TCP)
            if src_is_a != last_is_a:
                raise RuntimeError("the local address lies inside the source range; pick another")
            tk = bytes(key0)
            koff = (abi.CtKey.addr_a if src_is_a else abi.CtKey.addr_b).offset
            tv = bytes(abi.CtVal(last_seen_ns=time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE), epoch=epoch,
                                 rule_id=0, local_id=LOCAL_ID, remote_id=0, verdict=abi.Verdict.ALLOW,
                                 flags=abi.CT_SEEN_REPLY | (abi.CT_INIT_IS_A if src_is_a else 0)))
            roff, ioff = abi.CtVal.rule_id.offset, abi.CtVal.remote_id.offset
            out = []
            for i in range(self.n):
                v = bytearray(tv)
                U32.pack_into(v, roff, 1 + i % RULES)
                U32.pack_into(v, ioff, REMOTE_ID0 + i)
                out.append((_patch(tk, koff, BE32.pack(BENCH_BASE + i)), bytes(v)))
            return out
        return self._get(f"conntrack-epoch{epoch}", build)


# --- raw map helpers the loader does not need ---------------------------------------

_libbpf = None


def _lb():
    """A private handle on libbpf for calls the loader does not declare."""
    global _libbpf
    if _libbpf is None:
        _libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
        fn = _libbpf.bpf_map_lookup_and_delete_batch
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
    return _libbpf


def drain(m: Map, batch: int = 65536) -> int:
    """Empties a hash-type map (BPF_MAP_LOOKUP_AND_DELETE_BATCH); returns how many entries it held."""
    ksize, vsize = m.info.key_size, m.info.value_size
    keys = ctypes.create_string_buffer(ksize * batch)
    values = ctypes.create_string_buffer(vsize * batch)
    token_in, token_out = ctypes.create_string_buffer(8), ctypes.create_string_buffer(8)
    first, total = True, 0
    while True:
        count = ctypes.c_uint32(batch)
        ret = _lb().bpf_map_lookup_and_delete_batch(m.fd, None if first else token_in, token_out, keys, values,
                                                    ctypes.byref(count), None)
        total += count.value
        if ret < 0:
            code = -ret if ret != -1 else ctypes.get_errno()
            if code == errno.ENOENT:
                return total
            raise OSError(code, f"map {m.name}: lookup-and-delete batch: {os.strerror(code)}")
        ctypes.memmove(token_in, token_out, 8)
        first = False


def zero_counters(dp: Datapath) -> None:
    per_cpu = [abi.Counter()] * dp.reasons.ncpus
    for i in range(abi.REASON_MAX):
        dp.reasons.update(i, per_cpu)
    zero64 = [ctypes.c_uint64(0)] * dp.stats.ncpus
    for i in range(abi.STAT_MAX):
        dp.stats.update(i, zero64)


def read_counters(dp: Datapath) -> tuple[dict[str, int], dict[str, int]]:
    reasons = {}
    for i in range(abi.REASON_MAX):
        n = sum(c.packets for c in dp.reasons.lookup(i))
        if n:
            try:
                reasons[abi.Reason(i).name.lower()] = n
            except ValueError:
                reasons[str(i)] = n
    stats = {}
    for s in abi.Stat:
        n = sum(v.value for v in dp.stats.lookup(int(s)))
        if n:
            stats[s.name.lower()] = n
    return reasons, stats


# --- timing -----------------------------------------------------------------------

class Settings:
    def __init__(self, repeat: int, trials: int, warmup: int):
        self.repeat, self.trials, self.warmup = repeat, trials, warmup


def measure(prog_fd: int, frame: bytes, s: Settings, before=None, after=None, warmup: int | None = None) -> list[dict]:
    """One untimed warm-up run (s.warmup repetitions unless warmup is given),
    then s.trials timed runs of s.repeat repetitions.
    ns is the kernel's mean per repetition (integer ns; time the kernel spent
    rescheduling between repetitions is excluded); wall_ns is the syscall's
    wall time over the repetitions, for comparison. A failed trial is kept as
    {"error": ...}."""
    warmup = s.warmup if warmup is None else warmup
    out = []
    if warmup:
        try:
            if before:
                before()
            testrun.test_run(prog_fd, frame, repeat=warmup)
        except Exception as e:  # noqa: BLE001 - the timed trials may still run
            out.append({"warmup": True, "error": f"warm-up: {type(e).__name__}: {e}"})
            log(f"    warm-up: {out[-1]['error']}")
    for t in range(s.trials):
        try:
            if before:
                before()
            w0 = time.perf_counter_ns()
            r = testrun.test_run(prog_fd, frame, repeat=s.repeat)
            w1 = time.perf_counter_ns()
            rec = {"ns": r.duration_ns, "wall_ns": round((w1 - w0) / s.repeat, 2), "retval": r.retval}
            if after:
                rec.update(after())
        except Exception as e:  # noqa: BLE001 - a crashed trial is a result
            rec = {"error": f"{type(e).__name__}: {e}"}
        out.append(rec)
        log(f"    trial {t + 1}/{s.trials}: " + (f"{rec['ns']} ns" if "ns" in rec else rec["error"]))
    return out


def summarize(row: dict) -> dict:
    records = row.get("trials", [])
    trials = [t for t in records if not t.get("warmup")]
    if len(trials) != len(records):
        row["trials"] = trials
        row["warmup_error"] = next(t["error"] for t in records if t.get("warmup"))
    ok = [t["ns"] for t in trials if "ns" in t]
    failed = [t["error"] for t in trials if "error" in t]
    if ok:
        row["median_ns"] = statistics.median(ok)
        row["min_ns"] = min(ok)
        row["max_ns"] = max(ok)
        row["median_wall_ns"] = statistics.median(t["wall_ns"] for t in trials if "ns" in t)
    msgs = ([f"{len(failed)} of {len(trials)} trials failed: {failed[0]}"] if failed else []) + \
        ([row["warmup_error"]] if row.get("warmup_error") else [])
    if msgs:
        row["error"] = "; ".join(([row["error"]] if row.get("error") else []) + msgs)
    return row


# --- bare programs ----------------------------------------------------------------

BARE_C = r"""
#include "dp_abi.h"

BPF_HASH(bench_u32, __be32, __u64, BENCH_CAP);
BPF_HASH(bench_ct, struct dp_ct_key, struct dp_ct_val, BENCH_CAP);

int bench_empty(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/* The key generation of bpf/lib/bench.h, kept alive by a volatile store. */
int bench_keygen(struct xdp_md *ctx)
{
	volatile __be32 key = __builtin_bswap32(BENCH_BASE + (bpf_get_prandom_u32() & (BENCH_KEYS - 1)));
	return XDP_PASS;
}

int bench_lookup_u32(struct xdp_md *ctx)
{
	__be32 key = __builtin_bswap32(BENCH_BASE + (bpf_get_prandom_u32() & (BENCH_KEYS - 1)));
	return bench_u32.lookup(&key) ? XDP_PASS : XDP_DROP;
}

/* The conntrack key of an established flow from a random source. */
int bench_lookup_ct(struct xdp_md *ctx)
{
	struct dp_ct_key k = {};

	k.BENCH_SRC_SIDE[0] = __builtin_bswap32(BENCH_BASE + (bpf_get_prandom_u32() & (BENCH_KEYS - 1)));
	k.BENCH_DST_SIDE[0] = BENCH_LOCAL_BE;
	k.BENCH_SPORT_SIDE = BENCH_SPORT_BE;
	k.BENCH_DPORT_SIDE = BENCH_DPORT_BE;
	k.proto = 6;		/* IPPROTO_TCP */
	k.family = DP_FAMILY_IPV4;
	return bench_ct.lookup(&k) ? XDP_PASS : XDP_DROP;
}
"""


class BareModule:
    """The bare programs for one N, compiled with bcc (no pins)."""

    def __init__(self, n: int, bpf_dir: Path):
        from bcc import BPF

        _, src_is_a = ct_key(source(0), SPORT, LOCAL_ADDR, DPORT_ALLOWED, socket.IPPROTO_TCP)
        a, b = ("addr_a", "addr_b") if src_is_a else ("addr_b", "addr_a")
        pa, pb = ("port_a", "port_b") if src_is_a else ("port_b", "port_a")
        defines = {
            "BENCH_KEYS": n, "BENCH_CAP": n + CT_SLACK, "BENCH_BASE": f"{BENCH_BASE:#x}U",
            "BENCH_SRC_SIDE": a, "BENCH_DST_SIDE": b, "BENCH_SPORT_SIDE": pa, "BENCH_DPORT_SIDE": pb,
            "BENCH_LOCAL_BE": f"{int.from_bytes(LOCAL_ADDR.packed, 'little'):#x}U",
            "BENCH_SPORT_BE": f"{abi.htons(SPORT):#x}", "BENCH_DPORT_BE": f"{abi.htons(DPORT_ALLOWED):#x}",
        }
        cflags = [f"-I{bpf_dir / 'include'}"] + [f"-D{k}={v}" for k, v in defines.items()]
        self.n = n
        self.bpf = BPF(text=BARE_C.encode(), cflags=cflags)
        self.fds = {name: self.bpf.load_func(name, BPF.XDP).fd
                    for name in ("bench_empty", "bench_keygen", "bench_lookup_u32", "bench_lookup_ct")}
        # Own fds: Map closes its fd, bcc closes the table's.
        self.u32 = Map(os.dup(self.bpf["bench_u32"].map_fd), ctypes.c_uint32, ctypes.c_uint64, "bench_u32")
        self.ct = Map(os.dup(self.bpf["bench_ct"].map_fd), abi.CtKey, abi.CtVal, "bench_ct")

    def fill(self, contents: Contents) -> None:
        value = bytes(ctypes.c_uint64(1))
        self.u32.update_batch([(BE32.pack(BENCH_BASE + i), value) for i in range(self.n)])
        self.ct.update_batch(contents.flows(epoch=0))

    def close(self) -> None:
        self.u32.close()
        self.ct.close()
        self.bpf.cleanup()


def hit_check(prog_fd: int, frame: bytes, runs: int = 256) -> dict:
    """Single runs on fresh random keys: every one must find its key."""
    hits = sum(testrun.test_run(prog_fd, frame).retval == testrun.XDP_PASS for _ in range(runs))
    return {"expected": "hit", "share": hits / runs, "runs": runs}


def bare_rows(sizes: list[int], s: Settings, contents: dict[int, Contents], want: set[str],
              bpf_dir: Path) -> list[dict]:
    rows = []
    frame = tcp_frame(source(0), LOCAL_ADDR, SPORT, DPORT_ALLOWED, TCP_ACK)
    for idx, n in enumerate(sizes):
        figures = []
        if idx == 0 and "baseline" in want:
            figures += [("empty", "bench_empty", "empty XDP program (return XDP_PASS)", None),
                        ("keygen", "bench_keygen", "empty + random key generation", None)]
        if "lookup" in want:
            figures += [("lookup_u32", "bench_lookup_u32", "1 hash lookup, random u32 key", n),
                        ("lookup_ct", "bench_lookup_ct", "1 hash lookup, random conntrack key", n)]
        if not figures:
            continue
        module = None
        base = {"kind": "bare", "identity": None}
        pending = [dict(base, id=f"{fid}" + (f"_{n}" if en else ""), figure=label, entries=en,
                        program=fname, capacity=(n + CT_SLACK) if en else None)
                   for fid, fname, label, en in figures]
        try:
            log(f"bare programs, N={n}: compiling")
            t = time.monotonic()
            module = BareModule(n, bpf_dir)
            fill_error = None
            if "lookup" in want:
                try:
                    module.fill(contents[n])
                except Exception as e:  # noqa: BLE001 - fails the lookup rows only
                    fill_error = f"{type(e).__name__}: {e}"
            setup_s = round(time.monotonic() - t, 1)
            for row in pending:
                log(f"  {row['figure']}" + (f", N={n}" if row["entries"] else ""))
                row["setup_s"] = setup_s
                try:
                    if row["entries"] and fill_error:
                        raise RuntimeError(f"filling the map failed: {fill_error}")
                    fd = module.fds[row["program"]]
                    row["program_info"] = _prog_summary(fd)
                    if row["entries"]:
                        row["path"] = hit_check(fd, frame)
                        if row["path"]["share"] < 1:
                            raise RuntimeError(f"only {row['path']['share']:.1%} of lookups found their key")
                    t = time.monotonic()
                    row["trials"] = measure(fd, frame, s)
                    row["run_s"] = round(time.monotonic() - t, 1)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"
                    log(f"    error: {row['error']}")
        except Exception as e:  # noqa: BLE001
            for row in pending:
                row.setdefault("error", f"{type(e).__name__}: {e}")
            log(f"  error: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
        finally:
            if module is not None:
                module.close()
        rows += [summarize(r) for r in pending]
    return rows


def _prog_summary(fd: int) -> dict:
    info = libbpf.prog_info(fd)
    return {"xlated_insns": info.xlated_prog_len // 8, "jited_bytes": info.jited_prog_len,
            "verified_insns": info.verified_insns}


# --- enforcement ------------------------------------------------------------------

PARSE = ("ACK to port allowed, parse only", None, testrun.XDP_PASS,
         "parse only (the program stops after parsing: no lookup)")

FLOWS = {
    # flow: (packet, expected reason, expected XDP return, description)
    "established": ("ACK to port allowed, source in conntrack", abi.Reason.PASS_ESTABLISHED, testrun.XDP_PASS,
                    "established flow (conntrack hit)"),
    "new": ("SYN to port allowed, random source port", abi.Reason.PASS_POLICY, testrun.XDP_PASS,
            "new allowed flow (policy allow, conntrack insert)"),
    "denied": ("SYN to a port no entry names", abi.Reason.DROP_POLICY_DEFAULT, testrun.XDP_DROP,
               "denied flow (default deny, 6 policy misses)"),
}


def enforce_row(flow: str, identity: str, n: int, s: Settings, contents: Contents, bpf_dir: Path) -> dict:
    packet, expected, expected_ret, label = PARSE if flow == "parse" else FLOWS[flow]
    row = {"id": f"{flow}_{identity}_{n}", "kind": "enforcement", "figure": label, "flow": flow,
           "identity": identity, "entries": n, "program": "dp_xdp_ingress", "packet": packet}
    defines = [("DP_BENCH_KEYS", str(n)), ("DP_BENCH_BASE", f"{BENCH_BASE:#x}")]
    if flow == "parse":
        defines.append(("DP_BENCH_PARSE_ONLY", "1"))
    if flow == "new":
        defines.append(("DP_BENCH_RANDOM_SPORT", "1"))
        # Every trial starts from the N established flows and inserts up to
        # `repeat` new ones: room for all of them, so no insert evicts.
        ct_max = n + s.repeat + s.repeat // 4 + CT_SLACK
    else:
        ct_max = n + CT_SLACK
    opts = dict(identity=identity, ipcache_max=n + TABLE_SLACK, policy_max=n + TABLE_SLACK, ct_max=ct_max,
                extra_defines=tuple(defines))
    row["build"] = dict(opts, extra_defines=[list(d) for d in defines])
    if flow in ("established", "parse"):
        frame = tcp_frame(source(0), LOCAL_ADDR, SPORT, DPORT_ALLOWED, TCP_ACK)
    elif flow == "new":
        frame = tcp_frame(source(0), LOCAL_ADDR, SPORT, DPORT_ALLOWED, TCP_SYN)
    else:
        frame = tcp_frame(source(0), LOCAL_ADDR, SPORT, DPORT_DENIED, TCP_SYN)

    dp = Datapath(f"dpbench_{os.getpid()}_{row['id']}")
    log(f"enforcement: {label}, identity {identity}, N={n}")
    try:
        t = time.monotonic()
        dp.load(BuildOptions(pin_dir=dp.pin_dir, **opts), bpf_dir=bpf_dir)
        row["load_s"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        lpm = identity == "lpm"
        # The local endpoint and the CIDRs through the loader's writer (it also
        # lays out the prefix-length list), then the N hosts in bulk: /32 is
        # already in that list, so it stays right.
        wanted = {ipaddress.ip_network(LOCAL_ADDR): LOCAL_ID, **{ipaddress.ip_network(c): i for c, i in CIDRS.items()}}
        tables.sync_identities(dp, wanted)
        dp.ipcache.update_batch(contents.hosts(lpm))
        dp.policy.update_batch(contents.policy())
        epoch = dp.read_config().epoch
        flows = contents.flows(epoch)
        dp.ct.update_batch(flows)
        _spot_check(dp, n, lpm)
        row["fill_s"] = round(time.monotonic() - t, 1)
        row["program_info"] = dp.program_info("xdp_ingress")
        with open(dp.state_path) as f:   # hash of the sources and cflags this load was built from
            row["source_hash"] = json.load(f).get("source_hash")

        def before():
            if flow == "new":
                drain(dp.ct)
                dp.ct.update_batch(flows)
            zero_counters(dp)

        def after():
            if expected is None:
                return {}
            reasons, stats = read_counters(dp)
            total = sum(reasons.values())
            share = reasons.get(expected.name.lower(), 0) / total if total else 0.0
            return {"path": {"expected": expected.name.lower(), "share": round(share, 6), "reasons": reasons,
                             "stats": stats}}

        # New flows: a full-length warm-up, so that every timed trial finds the
        # preallocated free list in the order a used table has (the first drain
        # turns it from allocation order into bucket order) and inserts cost the same.
        warmup = s.repeat if flow == "new" else None
        t = time.monotonic()
        row["trials"] = measure(dp.prog_fds["xdp_ingress"], frame, s, before, after, warmup=warmup)
        row["run_s"] = round(time.monotonic() - t, 1)
        row["warmup"] = s.warmup if warmup is None else warmup
        # Random (source, port) pairs repeat now and then within a trial, and
        # the repeat hits the entry its first packet created: about
        # repeat / (2 * N * 64512) of a new-flow trial is expected to be
        # established packets (bench.h draws the port from 1024-65535).
        repeats = s.repeat / (2 * n * 64512) if flow == "new" else 0.0
        if expected is not None:
            _path_summary(row, expected, expected_ret, min_share=0.99 - repeats)
        elif any(t.get("retval") not in (None, expected_ret) for t in row["trials"]):
            row.setdefault("warnings", []).append(f"unexpected XDP return value (expected {expected_ret})")
    except Exception as e:  # noqa: BLE001 - reported in the row
        row["error"] = f"{type(e).__name__}: {e}"
        log(f"  error: {row['error']}")
        traceback.print_exc(file=sys.stderr)
    finally:
        try:
            dp.unload()
        except Exception as e:  # noqa: BLE001
            row.setdefault("warnings", []).append(f"unload failed: {e}")
            log(f"  unload of {dp.instance} failed: {e}")
    return summarize(row)


def _spot_check(dp: Datapath, n: int, lpm: bool) -> None:
    for i in sorted({0, n // 2, n - 1}):
        v = dp.ipcache.lookup(abi.ip_key(ipaddress.ip_network(source(i)), lpm))
        if v is None or v.identity != REMOTE_ID0 + i:
            raise RuntimeError(f"ipcache fill check failed for {source(i)}")
        if dp.policy.lookup(abi.PolicyKey(local_id=LOCAL_ID, remote_id=REMOTE_ID0 + i, dport=DPORT_ALLOWED,
                                          proto=socket.IPPROTO_TCP, dir=abi.Direction.INGRESS)) is None:
            raise RuntimeError(f"policy fill check failed for remote identity {REMOTE_ID0 + i}")


def _path_summary(row: dict, expected: abi.Reason, expected_ret: int, min_share: float) -> None:
    """Worst share of the expected reason over the trials, and a warning when
    a trial took another path than the one the row names more than expected."""
    shares = [t["path"]["share"] for t in row["trials"] if "path" in t]
    if shares:
        row["path"] = {"expected": expected.name.lower(), "share": min(shares), "min_expected": round(min_share, 4)}
        if min(shares) < min_share:
            row.setdefault("warnings", []).append(
                f"only {min(shares):.2%} of packets took the {expected.name.lower()} path")
    if any(t.get("retval") not in (None, expected_ret) for t in row["trials"]):
        row.setdefault("warnings", []).append(f"unexpected XDP return value (expected {expected_ret})")


# --- machine and report -----------------------------------------------------------

def snapshot_sources(into: Path) -> tuple[Path, str]:
    """A copy of bpf/ taken once: every configuration of a run is built from
    the same sources even if the tree changes meanwhile. Returns the copy and
    a hash of its C sources."""
    dst = into / "bpf"
    shutil.copytree(BPF_DIR, dst, ignore=shutil.ignore_patterns("*.json", "*.o"))
    h = hashlib.sha256()
    for path in sorted(dst.rglob("*")):
        if path.suffix in (".c", ".h"):
            h.update(str(path.relative_to(dst)).encode())
            h.update(path.read_bytes())
    return dst, h.hexdigest()[:16]


def machine() -> dict:
    import common

    try:
        import bcc
        bcc_version = getattr(bcc, "__version__", None)
    except ImportError:
        bcc_version = None
    return {**common.machine(), "bcc": bcc_version}


def ratios(rows: list[dict], sizes: list[int]) -> list[dict]:
    by_id = {r["id"]: r for r in rows}

    def med(rid):
        r = by_id.get(rid)
        return r.get("median_ns") if r and not r.get("error") else None

    out = []

    def add(what, num_id, den_id, kind="ratio"):
        a, b = med(num_id), med(den_id)
        if a is None or b is None or (kind == "ratio" and not b):
            return
        value = round(a / b, 2) if kind == "ratio" else round(a - b, 1)
        out.append({"what": what, "kind": kind, "value": value, "numerator": num_id, "denominator": den_id})

    add("key generation cost (keygen - empty), ns", "keygen", "empty", kind="difference")
    for n in sizes:
        for ident in ("hash", "lpm"):
            add(f"established ({ident} identity) / 1 lookup, conntrack key, N={_size_label(n)}",
                f"established_{ident}_{n}", f"lookup_ct_{n}")
            add(f"established ({ident} identity) / 1 lookup, u32 key, N={_size_label(n)}",
                f"established_{ident}_{n}", f"lookup_u32_{n}")
    for n in sizes:
        for flow in FLOWS:
            add(f"{flow}: LPM identity / hash identity, N={_size_label(n)}", f"{flow}_lpm_{n}", f"{flow}_hash_{n}")
    return out


def _size_label(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, label in ((1 << 20, "M"), (1 << 10, "k")):
        if n % unit == 0:
            return f"{n // unit}{label}"
    return str(n)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if isinstance(v, float) and not v.is_integer() else f"{int(v)}"


def markdown(report: dict) -> str:
    m, st = report["machine"], report["settings"]
    lines = [
        "### dp_xdp_ingress, ns/packet (BPF_PROG_TEST_RUN, random keys)",
        "",
        f"{m['cpu_model']}, {m['vcpus']} vCPUs, kernel {m['kernel']}, JIT {m['bpf_jit_enable']}, {m['date']}; "
        f"load average at start {(m['loadavg_start'] or '?').split(' ')[0]}, at end "
        f"{(report.get('loadavg_end') or '?').split(' ')[0]}.",
        f"{st['repeat']:,} repetitions per trial, {st['trials']} trials (+1 untimed warm-up of {st['warmup']:,}, "
        f"new flows {st['repeat']:,}); "
        f"median [min-max] of the kernel's mean ns per repetition.",
        "",
        "| figure | identity | entries | median ns | min | max | trials ok | path check |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        ok = sum(1 for t in r.get("trials", []) if "ns" in t)
        path = r.get("path")
        check = f"{path['expected']} {path['share']:.2%}" if path else "-"
        notes = []
        if r.get("error"):
            notes.append(f"ERROR: {r['error']}")
        notes += [f"warning: {w}" for w in r.get("warnings", [])]
        if notes:
            check = "; ".join([check] + notes) if check != "-" else "; ".join(notes)
        lines.append(f"| {r['figure']} | {r.get('identity') or '-'} | {_size_label(r.get('entries'))} | "
                     f"{_fmt(r.get('median_ns'))} | {_fmt(r.get('min_ns'))} | {_fmt(r.get('max_ns'))} | "
                     f"{ok}/{len(r.get('trials', [])) or st['trials']} | {check} |")
    if report["ratios"]:
        lines += ["", "| derived (medians) | value |", "|---|---:|"]
        for q in report["ratios"]:
            lines.append(f"| {q['what']} | {q['value']}{'x' if q['kind'] == 'ratio' else ''} |")
    lines += ["", f"Total run time {report['elapsed_s']:.0f} s."]
    if report.get("interrupted"):
        lines.append("Interrupted: the figures after the last row shown were not measured.")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------

def parse_size(text: str) -> int:
    t = text.strip()
    mult = {"k": 1 << 10, "K": 1 << 10, "m": 1 << 20, "M": 1 << 20}.get(t[-1:], 1)
    n = int(t[:-1] if mult > 1 else t) * mult
    if n < 2 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"{text}: sizes must be powers of two >= 2 "
                                         "(the benchmark build masks the random source with N-1)")
    if n > (1 << 24):
        raise argparse.ArgumentTypeError(f"{text}: at most 16M sources (the 10.0.0.0/8 range)")
    return n


GROUPS = ("baseline", "lookup", "hash", "lpm")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 10^5 repetitions, 3 trials (results to datapath_ns.quick.json)")
    ap.add_argument("--sizes", default="1k,1M",
                    help="entry counts, comma-separated powers of two, k/M suffixes (default 1k,1M)")
    ap.add_argument("--repeat", type=int, help="repetitions per trial (default 10^6, --quick 10^5)")
    ap.add_argument("--trials", type=int, help="timed trials per figure (default 5, --quick 3)")
    ap.add_argument("--only", default=",".join(GROUPS),
                    help=f"comma-separated subset of {', '.join(GROUPS)} (default all)")
    ap.add_argument("--out", type=Path, help="JSON output path")
    args = ap.parse_args(argv)

    try:
        sizes = sorted({parse_size(x) for x in args.sizes.split(",") if x.strip()})
    except (argparse.ArgumentTypeError, ValueError) as e:
        ap.error(str(e))
    want = {g.strip() for g in args.only.split(",") if g.strip()}
    if want - set(GROUPS):
        ap.error(f"--only: unknown group(s) {', '.join(sorted(want - set(GROUPS)))}")
    repeat = args.repeat or (10 ** 5 if args.quick else 10 ** 6)
    trials = args.trials or (3 if args.quick else 5)
    if repeat < 1 or trials < 1:
        ap.error("--repeat and --trials must be at least 1")
    s = Settings(repeat, trials, warmup=max(1, repeat // 10))
    out = args.out or RESULTS_DIR / ("datapath_ns.quick.json" if args.quick else "datapath_ns.json")

    check_privileges()
    check_bpffs()
    missing = kernel_headers_present()
    if missing:
        print(f"datapath_ns: {missing}", file=sys.stderr)
        return 2

    # A termination signal unwinds like Ctrl-C, so every loaded instance is unloaded.
    signal.signal(signal.SIGTERM, _on_term)
    report = collect(sizes, want, s, args.quick)
    interrupted = report.get("interrupted", False)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(markdown(report))
    print(f"\n(JSON: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out})")
    if interrupted:
        return 130
    return 1 if any(r.get("error") for r in report["rows"]) else 0


def planned_rows(sizes: list[int], want: set[str]) -> int:
    n = 0
    if "baseline" in want:
        n += 3                       # empty, keygen, parse
    if "lookup" in want:
        n += 2 * len(sizes)
    n += len(FLOWS) * len(sizes) * len(want & {"hash", "lpm"})
    return n


def collect(sizes: list[int], want: set[str], s: Settings, quick: bool = False, progress=None) -> dict:
    """Measures every figure; returns the report (rows, ratios, machine).
    progress(label) is called after each row. Ctrl-C keeps what was measured
    (report["interrupted"])."""
    step = progress or (lambda label: None)
    started = time.monotonic()
    workdir = tempfile.TemporaryDirectory(prefix="datapath_ns_")
    bpf_dir, bpf_hash = snapshot_sources(Path(workdir.name))
    report = {
        "benchmark": "datapath_ns",
        "format": 1,
        "machine": machine(),
        "settings": {"repeat": s.repeat, "trials": s.trials, "warmup": s.warmup, "sizes": sizes, "quick": quick,
                     "groups": sorted(want), "frame_bytes": 60, "bench_base": str(source(0)),
                     "local": str(LOCAL_ADDR), "cidrs": list(CIDRS), "rules": RULES,
                     "bpf_sources_hash": bpf_hash},
        "rows": [],
    }
    contents = {n: Contents(n) for n in sizes}
    interrupted = False
    try:
        if want & {"baseline", "lookup"}:
            report["rows"] += bare_rows(sizes, s, contents, want, bpf_dir)
            step("per-packet: bare programs")
        if "baseline" in want:
            report["rows"].append(enforce_row("parse", "hash", sizes[0], s, contents[sizes[0]], bpf_dir))
            step("per-packet: parse only")
        for n in sizes:
            for identity in ("hash", "lpm"):
                if identity not in want:
                    continue
                for flow in FLOWS:
                    report["rows"].append(enforce_row(flow, identity, n, s, contents[n], bpf_dir))
                    step(f"per-packet: {flow}, {identity}, N={_size_label(n)}")
            contents[n] = Contents(n)   # release this size's key bytes
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: writing what was measured so far")
    finally:
        workdir.cleanup()

    report["rows"] = _ordered(report["rows"], sizes)
    report["ratios"] = ratios(report["rows"], sizes)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
    if interrupted:
        report["interrupted"] = True
    return report


def _on_term(signum, frame):
    raise KeyboardInterrupt


def _ordered(rows: list[dict], sizes: list[int]) -> list[dict]:
    """Table order: baselines, lookups by size, then enforcement by identity, flow, size."""
    def key(r):
        if r["kind"] == "bare":
            return (0, ["bench_empty", "bench_keygen", "bench_lookup_u32", "bench_lookup_ct"].index(r["program"]),
                    r.get("entries") or 0)
        if r["flow"] == "parse":
            return (0, 4, 0)
        return (1 + ("hash", "lpm").index(r["identity"]), list(FLOWS).index(r["flow"]), r["entries"])
    return sorted(rows, key=key)


if __name__ == "__main__":
    sys.exit(main())
