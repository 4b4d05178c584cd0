#!/usr/bin/env python3
"""Live throughput through a veth, in packets per second: this project's XDP
datapath against empty XDP programs, the bare stack, iptables (nft and
legacy), nftables sets and verdict maps, and ipset.

    .venv/bin/python bench/live.py            # full run, ~2 minutes; needs root
    .venv/bin/python bench/live.py --quick    # smoke run, < 1 minute

Method
------
Traffic comes from bench/bpf/xdp_gen.c, an XDP program run with
BPF_PROG_TEST_RUN and BPF_F_TEST_XDP_LIVE_FRAMES: the kernel builds `repeat`
frames from one 64-byte Ethernet/IPv4/UDP template, runs the program on each
and really transmits what it redirects. It redirects every frame out of the
veth end in a "gen" namespace, so the frames arrive at the peer in a "sink"
namespace as if from a wire: the sink's XDP program (native on veth), its
stack and its firewall see real traffic. Live frames instead of a userspace
sender because a userspace sender tops out near 1 Mpps here (PLATFORM.md),
below what an XDP sink can take; the kernel generator is an order of
magnitude faster, so the sink, not the sender, is what is measured.

One test run of `repeat` frames takes wall time T; the sink counts what it
received, and throughput = frames counted at the sink / T. The generator runs
pinned to one CPU, and the sink runs on that same CPU: veth's ndo_xdp_xmit
queues frames in the peer's ring and schedules the peer's NAPI on the
sending CPU, and the test run enables bottom halves after every batch of 64
frames, so the sink's softirq (XDP program, stack, firewall) runs there,
between batches. T is therefore the generator's cost plus the sink's cost,
and a slow sink slows the generator instead of losing frames. When the
softirq is deferred to ksoftirqd the generator can outrun the sink: the veth
ring (256 frames) overflows and frames are dropped at transmit. Those drops
are part of the figure (counted / T) and every row's params list, per trial,
frames sent, frames the ring accepted, ring drops and frames counted.

Where the count comes from, per row:
  - no program: nothing attached to the sink veth; GRO is switched on because
    veth accepts redirected frames only while its NAPI runs (an XDP program
    or GRO enables it). Counted by the kernel's UDP NoPorts counter: the
    frames go to a closed UDP port, so the stack drops each one after the
    socket lookup (ICMP port-unreachable replies are rate-limited to ~1000/s).
  - empty XDP: `return XDP_DROP` counted by the veth's own XDP drop counter
    (ethtool -S rx_queue_0_xdp_drops); `return XDP_PASS` counted by UDP
    NoPorts as above.
  - this project: the datapath instance's per-reason counters
    (DROP_POLICY_DEFAULT for denied frames; PASS_POLICY + PASS_ESTABLISHED +
    PASS_REJUDGED for allowed ones, which then die at the closed port).
  - iptables / nftables / ipset: the packet counter of the deciding DROP rule,
    which follows N non-matching entries in the filter table's INPUT hook
    (no XDP program; GRO on, as for "no program").

The XDP rows share one topology and alternate trial by trial (empty DROP,
empty PASS, datapath denied, allowed, denied from 10k sources), so the
ratios between them compare trials taken moments apart. Each firewall
configuration gets fresh namespaces, so no table or hook outlives its rows.
Everything created (namespaces, veths, rules, sets, the datapath's pins) is
removed on exit, error or Ctrl-C.

Results: bench/results/live.json (--quick: live.quick.json) and a markdown
table on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import ipaddress
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import Progress, is_root, machine, measured, missing, ratio

RESULTS_DIR = ROOT / "bench" / "results"
GEN_SRC = ROOT / "bench" / "bpf" / "xdp_gen.c"
GROUP = "live"
UNIT = "Mpps"

# --- the test network ------------------------------------------------------------

GEN_ADDR = ipaddress.IPv4Address("10.77.0.1")    # gen namespace's veth end; the frames' source
SINK_ADDR = ipaddress.IPv4Address("10.77.0.2")   # sink namespace's veth end; the frames' destination
PREFIX = 24
MANY_BASE = ipaddress.IPv4Address("10.78.0.0")   # the 10k-source row: sources MANY_BASE + i
MANY_SOURCES = 10_000
SPORT = 40000                                    # fixed: allowed traffic is one established flow
PORT_ALLOWED = 5001                              # port A: the policy allows UDP here
PORT_DENIED = 5002                               # port B: nothing allows it; the firewalls drop it
FRAME_BYTES = 64                                 # Ethernet + IPv4 + UDP + 22 bytes of payload

GEN_ID = 400          # identity of the generator's address
SINK_ID = 300         # identity of the sink's address (the local endpoint)
MANY_ID0 = 65536      # identity of MANY_BASE + i is MANY_ID0 + i
RULE_ALLOW = 1        # the one policy rule: GEN_ID -> SINK_ID, UDP port A, ingress, allow

NONMATCH_BASE = int(ipaddress.IPv4Address("172.16.0.0"))   # firewall entries that never match
SIZES = (100, 1000, 10_000)

SETTLE_S = 0.05       # after a test run: the sink drains what is left in the veth ring (<= 256 frames)
CALIBRATE_MIN_S = 0.03   # warm-up: run until one test run's loop took this long
MIN_REPEAT, MAX_REPEAT = 1000, 50_000_000
DISTURBED_SLACK_S = 0.05   # room for a test run's fixed cost (15-30 ms, at times more) in that check

_labs = itertools.count()


def log(msg: str) -> None:
    print(f"[live {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sh(cmd: list[str], input: str | None = None, timeout: float = 60) -> str:
    out = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise RuntimeError(f"{' '.join(cmd[:6])}{' ...' if len(cmd) > 6 else ''}: "
                           f"{lines[-1] if lines else 'exit status ' + str(out.returncode)}")
    return out.stdout


def _in_ns(ns: str, *cmd: str, input: str | None = None) -> str:
    return _sh(["ip", "netns", "exec", ns, *cmd], input=input)


class Budget:
    """A case's share of the progress bar: 1 warm-up + its trials, whatever happens."""

    def __init__(self, progress: Progress, n: int):
        self.progress, self.left = progress, n

    def step(self, label: str, n: int = 1) -> None:
        n = min(n, self.left)
        if n > 0:
            self.progress.step(label, n)
            self.left -= n

    def finish(self, label: str) -> None:
        self.step(label, self.left)


def _label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


# --- frames -----------------------------------------------------------------------

def _csum(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp_frame(src_mac: bytes, dst_mac: bytes, src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address,
              sport: int, dport: int) -> bytes:
    """A FRAME_BYTES Ethernet/IPv4/UDP frame; UDP checksum 0 (none, valid for IPv4)."""
    payload = b"\0" * (FRAME_BYTES - 14 - 20 - 8)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                               src.packed, dst.packed))
    struct.pack_into("!H", ip, 10, _csum(bytes(ip)))
    return dst_mac + src_mac + struct.pack("!H", 0x0800) + bytes(ip) + udp


# --- the generator ------------------------------------------------------------------

class Generator:
    """bench/bpf/xdp_gen.c, compiled once, run by BPF_PROG_TEST_RUN in live-frames mode."""

    def __init__(self):
        from bcc import BPF

        from loader import libbpf

        self.libbpf = libbpf
        self.bpf = BPF(src_file=str(GEN_SRC).encode())
        self.fd = self.bpf.load_func(b"xdp_gen", BPF.XDP).fd
        self.cfg = self.bpf[b"gen_cfg"]
        # One CPU runs the generator and, through the softirq it raises, the sink.
        self.cpu = max(os.sched_getaffinity(0))

    def configure(self, ifindex: int, nsrc: int = 0, src_base: int = 0) -> None:
        v = self.cfg[0]
        v.ifindex, v.nsrc, v.src_base = ifindex, nsrc, src_base
        self.cfg[0] = v

    def send(self, netns: str, frame: bytes, repeat: int) -> tuple[float, int]:
        """Sends `repeat` frames; returns (wall seconds, kernel's mean ns per frame).
        The test run must be made from the namespace the redirect's ifindex
        belongs to: setns on this thread only, for the duration of the call."""
        from loader.netns import in_netns

        lb = self.libbpf
        buf = ctypes.create_string_buffer(frame, len(frame))
        # libbpf 1.1's struct bpf_test_run_opts (loader/libbpf.py) already has
        # flags and batch_size; data_out stays NULL, which live mode requires.
        opts = lb.BpfTestRunOpts(sz=ctypes.sizeof(lb.BpfTestRunOpts))
        opts.data_in = ctypes.cast(buf, ctypes.c_void_p)
        opts.data_size_in = len(frame)
        opts.repeat = repeat
        opts.flags = lb.BPF_F_TEST_XDP_LIVE_FRAMES
        opts.batch_size = 0          # the kernel's default, 64 frames (NAPI_POLL_WEIGHT)
        saved = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {self.cpu})     # this thread only
        try:
            with in_netns(netns):
                t0 = time.perf_counter()
                ret = lb.lib().bpf_prog_test_run_opts(self.fd, ctypes.byref(opts))
                seconds = time.perf_counter() - t0
        finally:
            os.sched_setaffinity(0, saved)
        if ret < 0:
            code = -ret if ret != -1 else ctypes.get_errno()
            raise OSError(code, f"live-frames test run: {os.strerror(code)}")
        return seconds, opts.duration

    def close(self) -> None:
        self.bpf.cleanup()


# --- a gen and a sink namespace joined by a veth --------------------------------------

class Topology:
    def __init__(self, gro: bool):
        from dataplane.lab import Lab
        from loader.attach import ifindex_of

        self.lab = Lab(prefix=f"lv{os.getpid() % 100000}n{next(_labs)}")
        try:
            self.gen_ns, self.sink_ns = self.lab.ns("gen"), self.lab.ns("sink")
            self.gen_if, self.sink_if = self.lab.link(self.gen_ns, self.sink_ns, [f"{GEN_ADDR}/{PREFIX}"],
                                                      [f"{SINK_ADDR}/{PREFIX}"])
            if gro:
                _in_ns(self.sink_ns, "ethtool", "-K", self.sink_if, "gro", "on")
            self.gen_ifindex = ifindex_of(self.gen_if, self.gen_ns)
            self.sink_ifindex = ifindex_of(self.sink_if, self.sink_ns)
            self.gen_mac = self._mac(self.gen_ns, self.gen_if)
            self.sink_mac = self._mac(self.sink_ns, self.sink_if)
        except BaseException:
            self.lab.close()
            raise

    @staticmethod
    def _mac(ns: str, ifname: str) -> bytes:
        (info,) = json.loads(_sh(["ip", "-n", ns, "-j", "link", "show", "dev", ifname]))
        return bytes.fromhex(info["address"].replace(":", ""))

    def frame(self, dport: int) -> bytes:
        return udp_frame(self.gen_mac, self.sink_mac, GEN_ADDR, SINK_ADDR, SPORT, dport)

    def gen_xmit(self) -> tuple[int, int]:
        """(frames the sink's ring accepted, frames refused because it was full):
        veth's per-queue XDP transmit counters on the generator's end."""
        ok = err = 0
        for line in _in_ns(self.gen_ns, "ethtool", "-S", self.gen_if).splitlines()[1:]:
            key, _, value = line.strip().partition(":")
            if key.startswith("tx_queue_") and key.endswith("_xdp_xmit"):
                ok += int(value)
            elif key.startswith("tx_queue_") and key.endswith("_xdp_xmit_errors"):
                err += int(value)
        return ok, err

    def sink_ethtool(self, suffix: str) -> int:
        total = 0
        for line in _in_ns(self.sink_ns, "ethtool", "-S", self.sink_if).splitlines()[1:]:
            key, _, value = line.strip().partition(":")
            if key.startswith("rx_queue_") and key.endswith(suffix):
                total += int(value)
        return total

    def udp_noports(self) -> int:
        lines = [ln.split() for ln in _in_ns(self.sink_ns, "cat", "/proc/net/snmp").splitlines()
                 if ln.startswith("Udp:")]
        head, values = lines[0], lines[1]
        return int(values[head.index("NoPorts")])

    def close(self) -> None:
        self.lab.close()


# --- one measured configuration ------------------------------------------------------------

@dataclasses.dataclass
class Case:
    id: str
    name: str
    count: Callable[[], int]                 # the sink's cumulative count of this case's frames
    counted_by: str
    topo: Topology | None = None
    dport: int = PORT_DENIED
    nsrc: int = 0                            # > 0: the generator draws sources from MANY_BASE
    prepare: Callable[[], None] = lambda: None   # before each trial (the XDP rows swap programs)
    params: dict = dataclasses.field(default_factory=dict)
    note: str = ""
    repeat: int = 0
    trials: list = dataclasses.field(default_factory=list)
    detail: list = dataclasses.field(default_factory=list)
    warmup: list = dataclasses.field(default_factory=list)
    error: str | None = None                 # set: the case could not run at all

    def row(self) -> dict:
        if self.error and not self.trials:
            return measured(GROUP, self.id, self.name, UNIT, [f"setup failed: {self.error}"], "higher",
                            self.params, self.note)
        p = dict(self.params)
        ok = [d for d in self.detail if "counted" in d]
        p.update({
            "counted_by": self.counted_by,
            "repeat": self.repeat,
            "frames_sent": [d["sent"] for d in ok],
            "frames_into_ring": [d["xmit"] for d in ok],
            "ring_drops": [d["ring_drops"] for d in ok],
            "frames_counted": [d["counted"] for d in ok],
            "seconds": [round(d["seconds"], 4) for d in ok],
            "kernel_ns_per_frame": [d["kernel_ns"] for d in ok],
            # The same counts over the kernel's loop time (no fixed cost; but it
            # also leaves out any time the sink spent in ksoftirqd): for reference.
            "mpps_kernel_timed": [round(d["counted"] / (d["kernel_ns"] * d["sent"]) * 1e3, 4)
                                  for d in ok if d["kernel_ns"]],
            "warmup": self.warmup,
        })
        note = self.note
        drops = sum(d["ring_drops"] for d in ok)
        sent = sum(d["sent"] for d in ok)
        if sent and drops / sent > 0.001:
            note = (note + "; " if note else "") + f"veth ring dropped {drops / sent:.1%} of frames sent"
        short = [d for d in ok if d["xmit"] and d["counted"] < 0.99 * d["xmit"]]
        if short:
            worst = min(d["counted"] / d["xmit"] for d in short)
            note = (note + "; " if note else "") + \
                f"{len(short)} trial(s) counted < 99% of the frames delivered (min {worst:.1%})"
        # Wall time also counts any time other processes took the CPU from the
        # generator (and so from the sink); the kernel's loop time leaves out
        # its reschedules. A trial whose wall time is well past its loop time
        # was disturbed by other load: say so, with the kernel-timed figure.
        disturbed = [d for d in ok if d["kernel_ns"] and
                     d["seconds"] > 1.25 * d["kernel_ns"] * d["sent"] * 1e-9 + DISTURBED_SLACK_S]
        if disturbed:
            kt = statistics.median(p["mpps_kernel_timed"]) if p["mpps_kernel_timed"] else None
            note = (note + "; " if note else "") + \
                f"{len(disturbed)}/{len(ok)} trials disturbed by other load (wall time > 1.25x the kernel's " \
                f"loop time)" + (f"; kernel-timed median {kt:.3g} Mpps" if kt else "")
        return measured(GROUP, self.id, self.name, UNIT, self.trials, "higher", p, note)


def _one_run(gen: Generator, case: Case, repeat: int) -> dict:
    topo = case.topo
    case.prepare()
    gen.configure(topo.gen_ifindex, case.nsrc, int(MANY_BASE) if case.nsrc else 0)
    x0, c0 = topo.gen_xmit(), case.count()
    seconds, kernel_ns = gen.send(topo.gen_ns, topo.frame(case.dport), repeat)
    time.sleep(SETTLE_S)
    c1, x1 = case.count(), topo.gen_xmit()
    return {"sent": repeat, "xmit": x1[0] - x0[0], "ring_drops": x1[1] - x0[1], "counted": c1 - c0,
            "seconds": seconds, "kernel_ns": kernel_ns}


def calibrate(gen: Generator, case: Case, target_s: float) -> None:
    """Untimed warm-up runs that also size `repeat` so that a trial's test run
    lasts ~target_s of wall time (a fast sink takes millions of frames,
    iptables with 10k rules a few thousand).

    Every live-frames test run also has a fixed cost of some 15-30 ms here
    (setting up and tearing down its page pool, which waits for RCU) during
    which no frame moves. The per-frame time therefore comes from the
    kernel's own mean (opts.duration, the loop only), and the fixed part is
    what the wall time adds to it. All trials aim at the same wall time, so
    the fixed cost lowers every row's figure by about the same factor and
    cancels out of the ratios."""
    repeat = 5000
    for _ in range(3):
        d = _one_run(gen, case, repeat)
        case.warmup.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()})
        per_frame = d["kernel_ns"] * 1e-9 or d["seconds"] / d["sent"]
        if per_frame * d["sent"] >= CALIBRATE_MIN_S:
            break
        repeat = min(MAX_REPEAT, int(CALIBRATE_MIN_S / per_frame) + 1)
    if d["counted"] <= 0:
        raise RuntimeError(f"the sink counted none of {d['sent']} frames ({d['xmit']} reached its ring)")
    fixed = max(0.0, d["seconds"] - per_frame * d["sent"])
    case.params["fixed_cost_ms"] = round(fixed * 1e3, 1)
    case.repeat = max(MIN_REPEAT, min(MAX_REPEAT, int(max(target_s - fixed, target_s / 2) / per_frame)))


def trial(gen: Generator, case: Case) -> None:
    try:
        d = _one_run(gen, case, case.repeat)
        case.detail.append(d)
        case.trials.append(d["counted"] / d["seconds"] / 1e6)
    except Exception as e:  # noqa: BLE001 - kept in the row's trials
        log(f"  {case.id}: trial failed: {type(e).__name__}: {e}")
        case.trials.append(f"{type(e).__name__}: {e}")
        case.detail.append({"error": str(e)})


# --- XDP sinks: empty programs and this project's datapath -------------------------------------

EMPTY_C = b"""
int xdp_drop_all(struct xdp_md *ctx) { return XDP_DROP; }
int xdp_pass_all(struct xdp_md *ctx) { return XDP_PASS; }
"""


class XdpSlot:
    """What is attached to the sink veth: an empty program, the datapath, or nothing."""

    def __init__(self, topo: Topology, empty_fds: dict[str, int], dp):
        self.topo, self.empty_fds, self.dp = topo, empty_fds, dp
        self.current: str | None = None

    def _empty_attach(self, fd: int) -> None:
        from loader import libbpf
        from loader.netns import in_netns

        with in_netns(self.topo.sink_ns):   # netlink talks to the caller's namespace
            ret = libbpf.lib().bpf_xdp_attach(self.topo.sink_ifindex, fd, libbpf.XDP_FLAGS_DRV_MODE, None)
        if ret < 0:
            raise OSError(-ret, f"attach XDP to {self.topo.sink_if}: {os.strerror(-ret)}")

    def _empty_detach(self) -> None:
        from loader import libbpf
        from loader.netns import in_netns

        with in_netns(self.topo.sink_ns):
            libbpf.lib().bpf_xdp_detach(self.topo.sink_ifindex, libbpf.XDP_FLAGS_DRV_MODE, None)

    def use(self, what: str) -> None:
        if what == self.current:
            return
        if self.current == "dp":
            self.dp.detach(self.topo.sink_if, self.topo.sink_ns)
        elif self.current is not None and what == "dp":
            self._empty_detach()
        self.current = None
        if what == "dp":
            self.dp.attach(self.topo.sink_if, netns=self.topo.sink_ns, ingress="xdp", xdp_mode="native")
        else:
            self._empty_attach(self.empty_fds[what])   # replaces the other empty program atomically
        self.current = what

    def clear(self) -> None:
        if self.current == "dp":
            self.dp.detach(self.topo.sink_if, self.topo.sink_ns)
        elif self.current is not None:
            self._empty_detach()
        self.current = None


def _reason_count(dp, reasons) -> Callable[[], int]:
    def count() -> int:
        got = dp.reason_counters()
        return sum(got.get(r, (0, 0))[0] for r in reasons)
    return count


def _load_datapath(dp) -> dict:
    """Loads the instance and applies the benchmark's state: the generator's
    address, the sink's and MANY_SOURCES more each with an identity; one rule
    allowing UDP port A from the generator to the sink; the rest is denied by
    default."""
    from loader import abi, tables
    from loader.compile import BuildOptions

    t = time.monotonic()
    dp.load(BuildOptions(pin_dir=dp.pin_dir))
    load_s = time.monotonic() - t
    identities = {ipaddress.ip_network(f"{GEN_ADDR}/32"): GEN_ID, ipaddress.ip_network(f"{SINK_ADDR}/32"): SINK_ID}
    for i in range(MANY_SOURCES):
        identities[ipaddress.ip_network(f"{MANY_BASE + i}/32")] = MANY_ID0 + i
    entries = [tables.PolicyEntry(local_id=SINK_ID, remote_id=GEN_ID, direction=abi.Direction.INGRESS,
                                  proto=socket.IPPROTO_UDP, port_lo=PORT_ALLOWED, port_hi=PORT_ALLOWED,
                                  action=abi.Verdict.ALLOW, rule_id=RULE_ALLOW)]
    applied = tables.apply_state(dp, identities, entries)
    return {"load_s": round(load_s, 2), "apply_s": round(applied.seconds, 3), "identities": len(identities),
            "policy_entries": len(entries)}


# Every denied packet emits an event; with no reader the ring fills within a
# few thousand packets and each later event is only counted as lost.
NO_READER = "no event reader: deny events past the full ring only counted as lost"

XDP_IDS = ("live_xdp_drop", "live_xdp_pass", "live_dp_denied", "live_dp_allowed", "live_dp_denied_10k_src")


def xdp_group(gen: Generator, trials: int, target_s: float, progress: Progress,
              budgets: dict[str, Budget]) -> list[Case]:
    from bcc import BPF

    from loader import abi
    from loader.instance import Datapath

    dp = Datapath(f"dpbench_live_{os.getpid()}")
    topo = empty = slot = None
    dp_info: dict = {}
    cases: list[Case] = []
    try:
        topo = Topology(gro=False)
        empty = BPF(text=EMPTY_C)
        fds = {"drop": empty.load_func(b"xdp_drop_all", BPF.XDP).fd,
               "pass": empty.load_func(b"xdp_pass_all", BPF.XDP).fd}
        slot = XdpSlot(topo, fds, dp)
        xdp_note = "native XDP on the sink veth"
        cases = [
            Case("live_xdp_drop", "empty XDP program, XDP_DROP", lambda: topo.sink_ethtool("_xdp_drops"),
                 "veth rx_queue_*_xdp_drops (ethtool -S)", topo, prepare=lambda: slot.use("drop"),
                 params={"sink": xdp_note}),
            Case("live_xdp_pass", "empty XDP program, XDP_PASS (stack drops: closed UDP port)", topo.udp_noports,
                 "UDP NoPorts (/proc/net/snmp)", topo, prepare=lambda: slot.use("pass"),
                 params={"sink": xdp_note}),
        ]
        pass_reasons = (abi.Reason.PASS_POLICY, abi.Reason.PASS_ESTABLISHED, abi.Reason.PASS_REJUDGED)
        dp_params = {"sink": f"datapath {dp.instance}, XDP ingress (native) + TC egress", "port_allowed": PORT_ALLOWED,
                     "port_denied": PORT_DENIED}
        dp_cases = [
            Case("live_dp_denied", "this project, denied (default deny)",
                 _reason_count(dp, (abi.Reason.DROP_POLICY_DEFAULT,)), "datapath reason drop_policy_default",
                 topo, dport=PORT_DENIED, prepare=lambda: slot.use("dp"), params=dict(dp_params),
                 note=NO_READER),
            Case("live_dp_allowed", "this project, allowed (one established flow; stack drops: closed UDP port)",
                 _reason_count(dp, pass_reasons), "datapath reasons pass_policy+pass_established+pass_rejudged",
                 topo, dport=PORT_ALLOWED, prepare=lambda: slot.use("dp"), params=dict(dp_params)),
            Case("live_dp_denied_10k_src", f"this project, denied, {_label(MANY_SOURCES)} distinct sources",
                 _reason_count(dp, (abi.Reason.DROP_POLICY_DEFAULT,)), "datapath reason drop_policy_default",
                 topo, dport=PORT_DENIED, nsrc=MANY_SOURCES, prepare=lambda: slot.use("dp"),
                 params=dict(dp_params, sources=MANY_SOURCES), note=NO_READER),
        ]
        cases += dp_cases
        try:
            progress.note("live: loading the datapath")
            dp_info = _load_datapath(dp)
            for c in dp_cases:
                c.params.update(dp_info)
        except Exception as e:  # noqa: BLE001 - the empty-program rows still run
            log(f"datapath load failed: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
            for c in dp_cases:
                c.error = f"datapath: {type(e).__name__}: {e}"

        runnable = []
        for c in cases:
            if c.error:
                budgets[c.id].finish(f"live: {c.id} skipped")
                continue
            try:
                progress.note(f"live: {c.id} warm-up")
                calibrate(gen, c, target_s)
                runnable.append(c)
                budgets[c.id].step(f"live: {c.id} warm-up")
            except Exception as e:  # noqa: BLE001 - this row fails, the others run
                log(f"  {c.id}: warm-up failed: {type(e).__name__}: {e}")
                c.error = f"{type(e).__name__}: {e}"
                budgets[c.id].finish(f"live: {c.id} failed")
        # Round robin: trial i of every case before trial i + 1 of any.
        for i in range(trials):
            for c in runnable:
                trial(gen, c)
                budgets[c.id].step(f"live: {c.id} {i + 1}/{trials}")
        if dp_info:
            st = dp.stat_counters()
            for c in dp_cases:
                c.params["events_lost_total"] = st.get(abi.Stat.EVENTS_LOST, 0)
                c.params["ct_created_total"] = st.get(abi.Stat.CT_CREATED, 0)
    finally:
        try:
            if slot is not None:
                slot.clear()
        except Exception as e:  # noqa: BLE001
            log(f"detach from the sink veth failed: {e}")
        try:
            dp.unload()
        except Exception as e:  # noqa: BLE001
            log(f"unload of {dp.instance} failed: {e}")
        if empty is not None:
            empty.cleanup()
        if topo is not None:
            topo.close()
    return cases


# --- the stack and firewalls (no XDP program; GRO on) ---------------------------------------------

def _addr(i: int) -> str:
    return str(ipaddress.IPv4Address(NONMATCH_BASE + i))


def _iptables_rules(n: int, tool: str) -> str:
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    if tool == "ipset":
        lines.append("-A INPUT -m set --match-set lvblocked src -j DROP")
    else:
        lines += [f"-A INPUT -s {_addr(i)}/32 -j DROP" for i in range(n)]
    lines += [f"-A INPUT -p udp -m udp --dport {PORT_DENIED} -j DROP", "COMMIT", ""]
    return "\n".join(lines)


def _nft_script(n: int, kind: str) -> str:
    if kind == "set":
        decl = f"set blocked {{ type ipv4_addr; elements = {{ {', '.join(_addr(i) for i in range(n))} }} }}"
        match = "ip saddr @blocked drop"
    else:
        decl = (f"map m {{ type ipv4_addr : verdict; "
                f"elements = {{ {', '.join(_addr(i) + ' : drop' for i in range(n))} }} }}")
        match = "ip saddr vmap @m"
    return (f"table ip lvbench {{\n  counter final {{ }}\n  {decl}\n"
            f"  chain input {{\n    type filter hook input priority 0; policy accept;\n    {match}\n"
            f"    udp dport {PORT_DENIED} counter name \"final\" drop\n  }}\n}}\n")


FIREWALLS = {
    # tool: (needed binaries, row label, id stem)
    "iptables-nft": (("iptables-nft", "iptables-nft-restore"), "iptables-nft, {n} rules", "live_ipt_nft_deny"),
    "iptables-legacy": (("iptables-legacy", "iptables-legacy-restore"), "iptables-legacy, {n} rules",
                        "live_ipt_legacy_deny"),
    "nft set": (("nft",), "nftables set, {n} elements", "live_nft_set_deny"),
    "nft vmap": (("nft",), "nftables verdict map, {n} elements", "live_nft_vmap_deny"),
    "ipset": (("ipset", "iptables-nft", "iptables-nft-restore"), "ipset hash:ip, {n} elements (iptables-nft -m set)",
              "live_ipset_deny"),
}


def _firewall_setup(topo: Topology, tool: str, n: int) -> Callable[[], int]:
    """Loads the rules into the sink namespace; returns the deciding rule's packet counter."""
    ns = topo.sink_ns
    if tool in ("iptables-nft", "iptables-legacy", "ipset"):
        binary = "iptables-legacy" if tool == "iptables-legacy" else "iptables-nft"
        if tool == "ipset":
            # ipset sets live in the namespace and go with it.
            _in_ns(ns, "ipset", "restore", input=f"create lvblocked hash:ip maxelem {max(65536, 2 * n)}\n"
                   + "".join(f"add lvblocked {_addr(i)}\n" for i in range(n)))
        _in_ns(ns, f"{binary}-restore", input=_iptables_rules(n, tool))
        position = 2 if tool == "ipset" else n + 1

        def count() -> int:
            line = _in_ns(ns, binary, "-w", "-L", "INPUT", str(position), "-v", "-x", "-n").split()
            return int(line[0])
        return count
    _in_ns(ns, "nft", "-f", "-", input=_nft_script(n, "set" if tool == "nft set" else "vmap"))

    def count() -> int:
        for obj in json.loads(_in_ns(ns, "nft", "-j", "list", "counter", "ip", "lvbench", "final"))["nftables"]:
            if "counter" in obj:
                return int(obj["counter"]["packets"])
        raise RuntimeError("nft counter 'final' not found")
    return count


def run_separately(gen: Generator, case: Case, setup: Callable[[Topology], Callable[[], int]], trials: int,
                   target_s: float, progress: Progress, budget: Budget) -> None:
    """A case with namespaces of its own: set up, warm up, trials, tear down."""
    topo = None
    try:
        progress.note(f"live: {case.id} setup")
        t = time.monotonic()
        topo = Topology(gro=True)
        case.topo = topo
        case.count = setup(topo)
        case.params["setup_s"] = round(time.monotonic() - t, 2)
        calibrate(gen, case, target_s)
        budget.step(f"live: {case.id} warm-up")
        for i in range(trials):
            trial(gen, case)
            budget.step(f"live: {case.id} {i + 1}/{trials}")
    except Exception as e:  # noqa: BLE001 - this row fails, the others run
        log(f"  {case.id}: {type(e).__name__}: {e}")
        case.error = f"{type(e).__name__}: {e}"
    finally:
        budget.finish(f"live: {case.id} done")
        if topo is not None:
            topo.close()


# --- the whole benchmark -----------------------------------------------------------------

def _preflight() -> str | None:
    if not is_root():
        return "needs root (BPF, network namespaces, iptables)"
    for tool in ("ip", "ethtool"):
        if not shutil.which(tool):
            return f"{tool} not found"
    try:
        import bcc  # noqa: F401

        from loader.compile import kernel_headers_present
        from loader.instance import check_bpffs
    except ImportError as e:
        return f"bcc not importable ({e}); run with .venv/bin/python (make setup)"
    problem = kernel_headers_present()
    if problem:
        return problem
    try:
        check_bpffs()
    except Exception as e:  # noqa: BLE001
        return str(e)
    return None


ALL_IDS = (["live_noprog", "live_xdp_drop", "live_xdp_pass", "live_dp_denied", "live_dp_allowed",
            "live_dp_denied_10k_src"]
           + [f"{stem}_{n}" for _, _, stem in FIREWALLS.values() for n in SIZES])


def collect(quick: bool, progress: Progress, rows: list[dict]) -> None:
    """Appends every row to `rows` as it is measured (so an interrupted run keeps them)."""
    trials = 3 if quick else 5
    target_s = 0.3 if quick else 0.75
    progress.add(len(ALL_IDS) * (1 + trials))
    budgets = {i: Budget(progress, 1 + trials) for i in ALL_IDS}

    why = _preflight()
    if why:
        rows += [missing(GROUP, i, i, UNIT, why, "higher") for i in ALL_IDS]
        for i in ALL_IDS:
            budgets[i].finish("live: not run")
        return

    try:
        gen = Generator()
    except Exception as e:  # noqa: BLE001 - nothing can run without it
        traceback.print_exc(file=sys.stderr)
        rows += [missing(GROUP, i, i, UNIT, f"generator: {type(e).__name__}: {e}", "higher") for i in ALL_IDS]
        for i in ALL_IDS:
            budgets[i].finish("live: not run")
        return
    try:
        shared = {"gen_cpu": gen.cpu, "frame_bytes": FRAME_BYTES, "trial_target_s": target_s}
        try:
            cases = xdp_group(gen, trials, target_s, progress, budgets)
        except Exception as e:  # noqa: BLE001 - e.g. the topology could not be built
            traceback.print_exc(file=sys.stderr)
            cases = [Case(i, i, lambda: 0, "", error=f"{type(e).__name__}: {e}") for i in XDP_IDS]
        for c in cases:
            budgets[c.id].finish(f"live: {c.id} done")
            c.params.update(shared)
            rows.append(c.row())

        noprog = Case("live_noprog", "no program (veth GRO on), stack drops: closed UDP port", lambda: 0,
                      "UDP NoPorts (/proc/net/snmp)", params=dict(shared, sink="no XDP program, GRO on"),
                      note="GRO on: veth takes redirected frames only with NAPI running")
        run_separately(gen, noprog, lambda topo: topo.udp_noports, trials, target_s, progress,
                       budgets[noprog.id])
        rows.append(noprog.row())

        for tool, (binaries, label, stem) in FIREWALLS.items():
            absent = [b for b in binaries if not shutil.which(b)]
            for n in SIZES:
                name = label.format(n=_label(n)) + ", denied"
                params = dict(shared, tool=tool, n=n, sink="filter INPUT hook; no XDP program, GRO on")
                if absent:
                    rows.append(missing(GROUP, f"{stem}_{n}", name, UNIT, f"{', '.join(absent)} not found",
                                        "higher", params))
                    budgets[f"{stem}_{n}"].finish(f"live: {stem}_{n} skipped")
                    continue
                case = Case(f"{stem}_{n}", name, lambda: 0, "packet counter of the deciding DROP rule",
                            params=params)
                run_separately(gen, case, lambda topo, t=tool, k=n: _firewall_setup(topo, t, k), trials,
                               target_s, progress, budgets[case.id])
                rows.append(case.row())
    finally:
        gen.close()


def ratios(rows: list[dict]) -> list[dict]:
    by = {r["id"]: r for r in rows}
    big = SIZES[-1]
    out = [
        ratio(GROUP, "live_ratio_denied_xdp_drop", "this project denied / empty XDP_DROP",
              by.get("live_dp_denied"), by.get("live_xdp_drop"), target=0.85,
              target_text=">= 0.85x (full enforcement live throughput >= 0.85x empty XDP)"),
        ratio(GROUP, "live_ratio_allowed_xdp_pass", "this project allowed / empty XDP_PASS",
              by.get("live_dp_allowed"), by.get("live_xdp_pass"), target=0.85,
              target_text=">= 0.85x (full enforcement live throughput >= 0.85x empty XDP)"),
        ratio(GROUP, f"live_ratio_denied_ipt_nft_{big}", f"this project denied / iptables-nft {_label(big)} rules",
              by.get("live_dp_denied"), by.get(f"live_ipt_nft_deny_{big}"), target=100, target_text=">= 100x"),
        ratio(GROUP, f"live_ratio_denied_nft_set_{big}", f"this project denied / nftables set {_label(big)}",
              by.get("live_dp_denied"), by.get(f"live_nft_set_deny_{big}"), target=1.5, target_text=">= 1.5x"),
        ratio(GROUP, f"live_ratio_denied_ipt_legacy_{big}",
              f"this project denied / iptables-legacy {_label(big)} rules",
              by.get("live_dp_denied"), by.get(f"live_ipt_legacy_deny_{big}")),
        ratio(GROUP, f"live_ratio_denied_nft_vmap_{big}", f"this project denied / nftables vmap {_label(big)}",
              by.get("live_dp_denied"), by.get(f"live_nft_vmap_deny_{big}")),
        ratio(GROUP, f"live_ratio_denied_ipset_{big}", f"this project denied / ipset {_label(big)}",
              by.get("live_dp_denied"), by.get(f"live_ipset_deny_{big}")),
    ]
    return out


def run(quick: bool, progress: Progress) -> list[dict]:
    """The suite's entry (bench/suite.py): measured rows, then the ratio rows."""
    rows: list[dict] = []
    collect(quick, progress, rows)
    return rows + ratios(rows)


# --- command line ------------------------------------------------------------------------

def _fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "x":
        return f"{v:.2f}x"
    return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"


def markdown(rows: list[dict], elapsed_s: float, quick: bool) -> str:
    lines = ["### Live throughput through veth (live-frames XDP generator), Mpps", "",
             "| figure | median | min | max | trials | frames sent / counted (median trial) | target | note |",
             "|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        ok = sum(isinstance(t, (int, float)) for t in r.get("trials", []))
        trials = f"{ok}/{len(r['trials'])}" if r.get("trials") else "-"
        p = r.get("params") or {}
        frames = "-"
        if p.get("frames_sent"):
            i = sorted(range(len(p["frames_sent"])), key=lambda k: p["frames_counted"][k] / p["seconds"][k])[
                len(p["frames_sent"]) // 2]
            frames = f"{p['frames_sent'][i]:,} / {p['frames_counted'][i]:,} in {p['seconds'][i]:.2f} s"
        target = ""
        if r.get("target_text"):
            target = f"{r['target_text']}: {'met' if r.get('met') else ('NOT met' if r.get('met') is False else '-')}"
        note = r.get("note") or ""
        if r.get("error"):
            note = (note + "; " if note else "") + f"ERROR: {r['error']}"
        lines.append(f"| {r['name']} | {_fmt(r['median'], r['unit'])} | {_fmt(r.get('min'), r['unit'])} | "
                     f"{_fmt(r.get('max'), r['unit'])} | {trials} | {frames} | {target} | {note} |")
    lines += ["", f"{'Quick run. ' if quick else ''}Total run time {elapsed_s:.0f} s."]
    return "\n".join(lines)


def _on_term(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 trials of ~0.3 s (results to live.quick.json)")
    ap.add_argument("--out", type=Path, help="JSON output path")
    args = ap.parse_args(argv)
    out = args.out or RESULTS_DIR / ("live.quick.json" if args.quick else "live.json")
    signal.signal(signal.SIGTERM, _on_term)   # unwinds like Ctrl-C: everything is cleaned up

    started = time.monotonic()
    report = {"benchmark": "live", "format": 1, "machine": machine(), "quick": args.quick, "rows": []}
    progress = Progress(0)
    rows: list[dict] = []
    interrupted = False
    try:
        collect(args.quick, progress, rows)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: writing what was measured so far")
    finally:
        progress.close()
    report["rows"] = rows + ratios(rows)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
    report["interrupted"] = interrupted
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out)
    print(markdown(report["rows"], report["elapsed_s"], args.quick))
    print(f"\n(JSON: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out})")
    if interrupted:
        return 130
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
