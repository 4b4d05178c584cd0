#!/usr/bin/env python3
"""Control-plane costs: compiling and applying a large policy, map update
rates, and what a standalone agent costs in memory and CPU.

    .venv/bin/python bench/control.py            # full run (about 4 minutes)
    .venv/bin/python bench/control.py --quick    # smoke run (under a minute, smaller sizes)
    .venv/bin/python bench/control.py --footprint 500k # a smaller large state for the agent

Group "control" (one datapath instance, default map sizes, not attached):
  1. parse + compile, apply, and both together, of a generated policy and
     inventory that give host h0 ~10k identities and 100k policy entries.
     The sizes are in every row's name and params: R rules (rule objects in
     the policy document), each allowing one team of 100 remote workloads to
     reach one of 100 local workloads on K TCP ports, so R * 100 * K policy
     entries (= policy map keys per generation; every key is distinct).
     Parse + compile is what the agent does (dataplane.agent.load_sources +
     compile_for); apply is dataplane.agent.apply_compiled (capacity check,
     loader.tables.apply_state, the applied-state record), every trial from
     the same empty state (an empty state is applied between trials,
     untimed). The time until the new generation is live (ApplyResult.seconds)
     is its own row; the target (< 2 s) is on the whole call.
  2. one-rule change with that state in force: one port of one rule moves
     (a different port each trial, so each trial is a one-rule change from
     the state in force); parse + compile of the changed files (the compiler
     has no incremental path) and the apply, with the map writes it made.
  3. map updates per second into the ipcache: 100k inserts with
     Map.update_batch against 100k Map.update calls, and their ratio.

Group "footprint": a real `dataplane agent` process (standalone, XDP on a
veth in a namespace this benchmark creates, a small policy): idle RSS, idle
CPU over a window, then its policy and inventory files are rewritten to a
large state (~1M map entries per generation in a full run, ~100k with
--quick; --footprint picks another) and RSS/CPU are sampled every 50 ms until
the agent logs "applied:" with the expected entry count. One trial each.

Results go to bench/results/control.json (control.quick.json with --quick)
and a markdown table to stdout; progress to stderr. Every datapath
instance (dpbench_ctl_<pid>_*), namespace and process started here is
removed on exit, on error, and on Ctrl-C or SIGTERM. Needs root, bpffs and
kernel headers (`make setup`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import Progress, machine, measured, ratio, target_row

from dataplane.agent import Workspace, apply_compiled, compile_for, load_sources
from dataplane.lab import Lab
from loader import abi, tables
from loader.compile import BuildOptions, kernel_headers_present
from loader.instance import STATE_ROOT, Datapath, check_bpffs, check_privileges
from loader.maps import Map

RESULTS_DIR = ROOT / "bench" / "results"
CLI = ROOT / ".venv" / "bin" / "dataplane"
if not CLI.exists():
    CLI = Path(shutil.which("dataplane") or CLI)

GROUP, FOOT = "control", "footprint"
HOST = "h0"                          # the host every state is compiled for
TEAM = 100                           # remote workloads per team (a rule's sources)
PORT0 = 1000                         # rule r's ports: PORT0 + r*K .. PORT0 + r*K + K-1
MOVED_PORT0 = 30000                  # the one-rule change moves rule 0's first port here (+ trial)
APPLY_TARGET_S = 2.0
UPDATES = 100_000                    # figure 3: inserts per trial
UPDATE_BASE = int(ipaddress.IPv4Address("10.3.0.0"))   # figure 3's keys: fresh /32s
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(msg: str) -> None:
    print(f"control: {msg}", file=sys.stderr, flush=True)


# --- the generated node ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sizes:
    """Inventory and policy of figures 1-2. Identities: 2 hosts, `locals`
    workloads on h0, `remotes` workloads on h1 in teams of TEAM."""

    remotes: int
    locals: int
    rules: int
    ports: int                       # TCP ports per rule

    @property
    def teams(self) -> int:
        return self.remotes // TEAM

    @property
    def identities(self) -> int:
        return 2 + self.locals + self.remotes

    @property
    def prefixes(self) -> int:
        return self.identities           # one address (a /32) each

    @property
    def entries(self) -> int:
        return self.rules * TEAM * self.ports

    def label(self) -> str:
        return f"{self.entries // 1000}k"

    def describe(self) -> dict:
        return {"rules": self.rules, "ports_per_rule": self.ports, "sources_per_rule": TEAM,
                "destinations_per_rule": 1, "policy_entries": self.entries, "identities": self.identities,
                "prefixes": self.prefixes, "local_workloads": self.locals, "remote_workloads": self.remotes,
                "host": HOST}


FULL = Sizes(remotes=10_000, locals=100, rules=250, ports=4)       # 250 rules -> 100,000 entries, 10,102 identities
QUICK = Sizes(remotes=2_500, locals=100, rules=50, ports=5)        # 50 rules -> 25,000 entries, 2,602 identities


def _addr(base: str, i: int) -> str:
    return str(ipaddress.IPv4Address(base) + i)


def inventory_text(s: Sizes) -> str:
    lines = ["apiVersion: zt-dataplane/v1", "kind: Inventory", "hosts:",
             f"  - {{name: {HOST}, address: 10.0.0.1}}", "  - {name: h1, address: 10.0.0.2}", "endpoints:"]
    lines += [f"  - {{name: l{k}, host: {HOST}, address: {_addr('10.1.0.0', k)}, labels: {{app: loc{k}}}}}"
              for k in range(s.locals)]
    lines += [f"  - {{name: r{i}, host: h1, address: {_addr('10.2.0.0', i)}, "
              f"labels: {{app: r{i}, team: t{i % s.teams}}}}}" for i in range(s.remotes)]
    return "\n".join(lines) + "\n"


def rule_ports(s: Sizes, r: int, moved: int | None = None) -> list[int]:
    ports = [PORT0 + r * s.ports + j for j in range(s.ports)]
    if r == 0 and moved is not None:
        ports[0] = MOVED_PORT0 + moved
    return ports


def policy_text(s: Sizes, moved: int | None = None) -> str:
    """Rule r: team r % teams -> local workload r % locals on its own K ports,
    so no two entries share a policy key. `moved`: rule 0's first port moves."""
    lines = ["apiVersion: zt-dataplane/v1", "kind: Policy", "rules:"]
    for r in range(s.rules):
        ports = ", ".join(f"tcp/{p}" for p in rule_ports(s, r, moved))
        lines.append(f"  - {{name: rule-{r}, action: allow, from: [{{workload: {{team: t{r % s.teams}}}}}], "
                     f"to: [{{workload: {{app: loc{r % s.locals}}}}}], ports: [{ports}]}}")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class BigState:
    """The footprint's large state: named networks of /32 CIDRs (cheap to
    resolve: one identity each) and rules with many ports, so the compiled
    state is large without a slow compile."""

    networks: int
    cidrs_per_network: int
    rules: int
    ports: int
    remotes: int = 1000
    locals: int = 100

    @property
    def prefixes(self) -> int:
        return 2 + self.locals + self.remotes + self.networks * self.cidrs_per_network

    @property
    def entries(self) -> int:
        return self.rules * TEAM * self.ports

    def describe(self) -> dict:
        return {"prefixes": self.prefixes, "policy_entries": self.entries,
                "map_entries_per_generation": self.prefixes + self.entries, "rules": self.rules,
                "ports_per_rule": self.ports, "networks": self.networks,
                "cidrs_per_network": self.cidrs_per_network, "workloads": self.remotes + self.locals}


# The full run's default is ~1M (about 37 s of agent time on a quiet machine, 70 s on a busy one);
# --footprint 500k keeps a run on a busy machine within its time.
BIG_STATES = {
    "100k": BigState(networks=10, cidrs_per_network=1000, rules=9, ports=100),    # 11,102 + 90,000
    "500k": BigState(networks=50, cidrs_per_network=1000, rules=45, ports=100),   # 51,102 + 450,000
    "1m": BigState(networks=100, cidrs_per_network=1000, rules=90, ports=100),    # 101,102 + 900,000
}
FULL_BIG, QUICK_BIG = "1m", "100k"

# The agent's small policy: a client workload may reach a web workload.
SMALL_INVENTORY = f"""\
apiVersion: zt-dataplane/v1
kind: Inventory
hosts:
  - {{name: {HOST}, address: 10.250.0.2}}
  - {{name: h1, address: 10.250.0.1}}
endpoints:
  - {{name: web-1, host: {HOST}, address: 10.250.0.3, labels: {{app: web}}}}
  - {{name: cli-1, host: h1, address: 10.250.0.4, labels: {{app: cli}}}}
"""
SMALL_POLICY = """\
apiVersion: zt-dataplane/v1
kind: Policy
rules:
  - {name: cli-to-web, action: allow, from: [{workload: {app: cli}}], to: [{workload: {app: web}}], ports: [tcp/80]}
"""


def big_inventory_text(b: BigState) -> str:
    teams = b.remotes // TEAM
    lines = ["apiVersion: zt-dataplane/v1", "kind: Inventory", "hosts:",
             f"  - {{name: {HOST}, address: 10.250.0.2}}", "  - {name: h1, address: 10.250.0.1}", "endpoints:"]
    lines += [f"  - {{name: l{k}, host: {HOST}, address: {_addr('10.1.0.0', k)}, labels: {{app: loc{k}}}}}"
              for k in range(b.locals)]
    lines += [f"  - {{name: r{i}, host: h1, address: {_addr('10.2.0.0', i)}, "
              f"labels: {{app: r{i}, team: t{i % teams}}}}}" for i in range(b.remotes)]
    lines.append("networks:")
    base = int(ipaddress.IPv4Address("11.0.0.0"))
    for n in range(b.networks):
        first = base + n * b.cidrs_per_network
        cidrs = ", ".join(f"{ipaddress.IPv4Address(first + j)}/32" for j in range(b.cidrs_per_network))
        lines.append(f"  - {{name: net-{n}, labels: {{zone: z{n % 10}}}, cidrs: [{cidrs}]}}")
    return "\n".join(lines) + "\n"


def big_policy_text(b: BigState) -> str:
    teams = b.remotes // TEAM
    lines = ["apiVersion: zt-dataplane/v1", "kind: Policy", "rules:"]
    for r in range(b.rules):
        ports = ", ".join(f"tcp/{PORT0 + r * b.ports + j}" for j in range(b.ports))
        lines.append(f"  - {{name: big-{r}, action: allow, from: [{{workload: {{team: t{r % teams}}}}}], "
                     f"to: [{{workload: {{app: loc{r % b.locals}}}}}], ports: [{ports}]}}")
    return "\n".join(lines) + "\n"


# --- map writes made by an apply ----------------------------------------------------------

class WriteCounter:
    """Counts the entries an apply writes and deletes, per map, by wrapping
    the Map objects' write methods of one Datapath (instance attributes;
    one extra Python call per batch, the same in every timed trial)."""

    MAPS = ("ipcache", "plens", "gen", "policy", "ranges", "config")

    def __init__(self, dp: Datapath):
        self.counts: dict[str, dict[str, int]] = {}
        for name in self.MAPS:
            self._wrap(dp.maps[name], name)

    def reset(self) -> None:
        self.counts = {}

    def _add(self, name: str, what: str, n: int) -> None:
        c = self.counts.setdefault(name, {"written": 0, "deleted": 0})
        c[what] += n

    def _wrap(self, m, name: str) -> None:
        update_batch, delete_batch, update, delete = m.update_batch, m.delete_batch, m.update, m.delete

        def counted_update_batch(pairs, *a, **kw):
            pairs = pairs if isinstance(pairs, list) else list(pairs)
            self._add(name, "written", len(pairs))
            return update_batch(pairs, *a, **kw)

        def counted_delete_batch(keys, *a, **kw):
            keys = keys if isinstance(keys, list) else list(keys)
            self._add(name, "deleted", len(keys))
            return delete_batch(keys, *a, **kw)

        def counted_update(*a, **kw):
            self._add(name, "written", 1)
            return update(*a, **kw)

        def counted_delete(*a, **kw):
            self._add(name, "deleted", 1)
            return delete(*a, **kw)

        m.update_batch, m.delete_batch, m.update, m.delete = (counted_update_batch, counted_delete_batch,
                                                              counted_update, counted_delete)

    def summary(self) -> dict:
        return {"written": sum(c["written"] for c in self.counts.values()),
                "deleted": sum(c["deleted"] for c in self.counts.values()),
                "by_map": {k: dict(v) for k, v in sorted(self.counts.items())}}


# --- figures 1-3 ---------------------------------------------------------------------------

def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", "; ")[:300]


def _settle() -> None:
    """Before a timed section: no garbage of the previous trial left to collect."""
    gc.collect()


def _parse_compile(policy: Path, inventory: Path, ws: Workspace):
    pol, inv = load_sources(str(policy), str(inventory))
    _, state = compile_for(pol, inv, HOST, ws)
    return state


def _check_state(state, entries: int, prefixes: int) -> None:
    if len(state.entries) != entries or len(state.identities) != prefixes:
        raise RuntimeError(f"compiled {len(state.entries)} entries and {len(state.identities)} prefixes, "
                           f"the generator meant {entries} and {prefixes}")


def control_rows(s: Sizes, trials: int, progress: Progress, workdir: Path) -> list[dict]:
    params = s.describe()
    inv_path, pol_path = workdir / "inventory.yaml", workdir / "policy.yaml"
    inv_path.write_text(inventory_text(s))
    pol_path.write_text(policy_text(s))
    params["file_bytes"] = {"inventory": inv_path.stat().st_size, "policy": pol_path.stat().st_size}
    ws = Workspace("bench", str(workdir / "ws"))

    t = {k: [] for k in ("compile", "apply", "live", "total", "incr_compile", "incr_apply", "incr_live",
                         "incr_total", "batch", "single")}
    writes = {"apply": [], "incr_apply": []}
    dp, dp_error, counter = None, None, None
    inst = f"dpbench_ctl_{os.getpid()}_dp"
    try:
        try:
            check_privileges()
            check_bpffs()
            why = kernel_headers_present()
            if why:
                raise RuntimeError(why)
            dp = Datapath(inst)
            t0 = time.monotonic()
            dp.load(BuildOptions(pin_dir=dp.pin_dir))
            params["datapath"] = {"instance": "dpbench_ctl_<pid>_dp", "load_s": round(time.monotonic() - t0, 1),
                                  "ipcache_max": dp.ipcache.max_entries, "policy_max": dp.policy.max_entries,
                                  "identity": "hash", "attached": False}
            counter = WriteCounter(dp)
        except Exception as e:  # noqa: BLE001 - the compile figures still run
            dp_error = f"datapath not loaded: {_err(e)}"
            log(dp_error)
        progress.step("datapath loaded" if dp_error is None else "datapath load failed")

        # 1. compile + apply from the same (empty) state
        for k in range(trials):
            state = None
            try:
                _settle()
                t0 = time.perf_counter()
                state = _parse_compile(pol_path, inv_path, ws)
                c = time.perf_counter() - t0
                _check_state(state, s.entries, s.prefixes)
                t["compile"].append(c)
            except Exception as e:  # noqa: BLE001
                t["compile"].append(_err(e))
                c = None
            if dp_error or state is None:
                why = dp_error or "compile failed"
                for key in ("apply", "live", "total"):
                    t[key].append(why)
            else:
                try:
                    tables.apply_state(dp, {}, [])          # the same previous state every trial
                    _settle()
                    counter.reset()
                    t0 = time.perf_counter()
                    res = apply_compiled(dp, state, ws)
                    a = time.perf_counter() - t0
                    t["apply"].append(a)
                    t["live"].append(res.seconds)
                    t["total"].append(c + a)
                    writes["apply"].append(counter.summary())
                except Exception as e:  # noqa: BLE001
                    for key in ("apply", "live", "total"):
                        t[key].append(_err(e))
            log(f"trial {k + 1}/{trials}: compile {_fmt_s(t['compile'][-1])}, apply {_fmt_s(t['apply'][-1])}")
            del state
            progress.step(f"compile + apply {s.label()} {k + 1}/{trials}")

        # 2. one-rule change with the full state in force (the last trial of 1 left it)
        for k in range(trials):
            state = None
            try:
                pol_path.write_text(policy_text(s, moved=k + 1))
                _settle()
                t0 = time.perf_counter()
                state = _parse_compile(pol_path, inv_path, ws)
                c = time.perf_counter() - t0
                _check_state(state, s.entries, s.prefixes)
                t["incr_compile"].append(c)
            except Exception as e:  # noqa: BLE001
                t["incr_compile"].append(_err(e))
            if dp_error or state is None:
                for key in ("incr_apply", "incr_live", "incr_total"):
                    t[key].append(dp_error or "compile failed")
            elif not isinstance(t["apply"][-1] if t["apply"] else None, float) and k == 0:
                for key in ("incr_apply", "incr_live", "incr_total"):
                    t[key].append("the full state was not applied")
            else:
                try:
                    _settle()
                    counter.reset()
                    t0 = time.perf_counter()
                    res = apply_compiled(dp, state, ws)
                    a = time.perf_counter() - t0
                    t["incr_apply"].append(a)
                    t["incr_live"].append(res.seconds)
                    t["incr_total"].append(c + a)
                    writes["incr_apply"].append(counter.summary())
                except Exception as e:  # noqa: BLE001
                    for key in ("incr_apply", "incr_live", "incr_total"):
                        t[key].append(_err(e))
            log(f"one-rule change {k + 1}/{trials}: compile {_fmt_s(t['incr_compile'][-1])}, "
                f"apply {_fmt_s(t['incr_apply'][-1])}")
            del state
            progress.step(f"one-rule change {k + 1}/{trials}")

        # 3. map updates per second, batch against single
        _update_rates(dp, dp_error, trials, t, progress)
    finally:
        if dp is not None:
            try:
                dp.unload()
            except Exception as e:  # noqa: BLE001
                log(f"unload of {inst} failed: {e}")
    return _control_table(s, params, t, writes)


def _update_rates(dp, dp_error, trials: int, t: dict, progress: Progress) -> None:
    pairs, keys = None, None
    if dp is not None:
        try:
            gen = 1 - tables.active_generation(dp)
            pairs = [(abi.ip_key(ipaddress.ip_network((UPDATE_BASE + i, 32)), False, gen),
                      abi.IpVal(identity=70000 + i)) for i in range(UPDATES)]
            keys = [k for k, _ in pairs]
        except Exception as e:  # noqa: BLE001
            dp_error = _err(e)
    # The Map class's own methods: not WriteCounter's wrappers.
    m, update = (dp.ipcache if dp is not None else None), Map.update
    for k in range(trials):
        if dp_error or pairs is None:
            t["batch"].append(dp_error or "no datapath")
            t["single"].append(dp_error or "no datapath")
        else:
            # Alternate which goes first; both insert into a map without these keys.
            for kind in (("batch", "single") if k % 2 == 0 else ("single", "batch")):
                try:
                    _settle()
                    t0 = time.perf_counter()
                    if kind == "batch":
                        n = Map.update_batch(m, pairs)
                    else:
                        for key, value in pairs:
                            update(m, key, value)
                        n = len(pairs)
                    dt_ = time.perf_counter() - t0
                    if n != UPDATES:
                        raise RuntimeError(f"{n} of {UPDATES} written")
                    t[kind].append(UPDATES / dt_)
                except Exception as e:  # noqa: BLE001
                    t[kind].append(_err(e))
                finally:
                    try:
                        dp.ipcache.delete_batch(keys)
                    except Exception as e:  # noqa: BLE001
                        log(f"deleting figure 3's keys: {e}")
        progress.step(f"map updates {k + 1}/{trials}")


def _writes_note(ws: list[dict]) -> str:
    if not ws:
        return ""
    last = ws[-1]
    by = ", ".join(f"{m} {c['written']}" + (f"/-{c['deleted']}" if c["deleted"] else "")
                   for m, c in last["by_map"].items())
    return f"map writes per apply (both generations): {last['written']:,} written, {last['deleted']:,} deleted ({by})"


def _control_table(s: Sizes, params: dict, t: dict, writes: dict) -> list[dict]:
    E, P, R, L = s.entries, s.prefixes, s.rules, s.label()
    size = f"{R} rules -> {E:,} policy entries, {s.identities:,} identities / {P:,} prefixes"
    rows = []
    compile_row = measured(GROUP, f"compile_{L}", f"parse + compile: {size}", "s", t["compile"], "lower", params,
                           note="load_sources + Compiler.compile for host h0 (what the agent runs on a file change)")
    apply_row = measured(GROUP, f"apply_{L}", f"apply from empty: {E:,} entries + {P:,} prefixes (apply_compiled)",
                         "s", t["apply"], "lower", dict(params, map_writes=writes["apply"][-1:] or None),
                         note="whole call: capacity check, idle generation written, switch, other generation "
                              "written, record saved; " + _writes_note(writes["apply"]))
    live_row = measured(GROUP, f"apply_live_{L}", f"apply from empty, until the new generation is live: "
                        f"{E:,} entries + {P:,} prefixes", "s", t["live"], "lower", params,
                        note="ApplyResult.seconds: apply_state's start to the switch and epoch bump")
    total_row = measured(GROUP, f"compile_apply_{L}", f"parse + compile + apply: {size}", "s", t["total"], "lower",
                         params, note="sum of the two, per trial")
    rows += [compile_row, apply_row, live_row, total_row,
             target_row(GROUP, f"apply_{L}_target", f"apply of {E:,} entries (whole apply_compiled call)",
                        apply_row, APPLY_TARGET_S, "s")]
    if E != 100_000:
        rows[-1].update(met=None, error=f"target is for 100,000 entries; this run applied {E:,} (--quick)")
    change = dict(params, change="one port of rule-0 moves (a new port each trial): 100 entries out, 100 in, "
                                 "per generation", map_writes=writes["incr_apply"][-1:] or None)
    rows += [
        measured(GROUP, f"incr_compile_{L}", f"one-rule change: parse + compile ({size})", "s", t["incr_compile"],
                 "lower", change, note="no incremental compile: the whole policy and inventory again"),
        measured(GROUP, f"incr_apply_{L}", f"one-rule change: apply over the {E:,}-entry state (apply_compiled)",
                 "s", t["incr_apply"], "lower", change, note=_writes_note(writes["incr_apply"])),
        measured(GROUP, f"incr_apply_live_{L}", "one-rule change: until the new generation is live", "s",
                 t["incr_live"], "lower", change, note="ApplyResult.seconds"),
        measured(GROUP, f"incr_total_{L}", "one-rule change: parse + compile + apply", "s", t["incr_total"],
                 "lower", change),
    ]
    up = {"inserts": UPDATES, "map": "dp_ipcache_v3 (hash, 262144 entries)", "key": "/32, idle generation"}
    batch = measured(GROUP, "updates_batch_100k", "ipcache: 100k inserts with Map.update_batch (one call)",
                     "updates/s", t["batch"], "higher", up,
                     note="BPF_MAP_UPDATE_BATCH, 65,536 entries per syscall; key/value structs built before timing")
    single = measured(GROUP, "updates_single_100k", "ipcache: 100k inserts, one Map.update per entry",
                      "updates/s", t["single"], "higher", up,
                      note="one bpf_map_update_elem per entry through loader.maps (ctypes); keys removed between runs")
    rows += [batch, single, ratio(GROUP, "updates_batch_vs_single", "ipcache inserts: batch / single (updates/s)",
                                  batch, single)]
    return rows


def _fmt_s(v) -> str:
    return f"{v:.2f} s" if isinstance(v, float) else str(v)


# --- footprint ---------------------------------------------------------------------------------

def _proc_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rpartition(")")[2].split()
    return int(rest[11]) + int(rest[12])          # utime + stime, all threads


def _proc_mem_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


APPLIED = re.compile(r"INFO: applied: (\d+) entries, (\d+) prefixes, .*?, ([\d.]+) ms")


class AgentLog:
    """The agent's log file, read as it grows."""

    def __init__(self, path: Path):
        self.path = path
        self.pos = 0
        self.applied: list[tuple[int, int, float]] = []

    def poll(self) -> None:
        with self.path.open("rb") as f:
            f.seek(self.pos)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.pos += end
        for line in data[:end].decode(errors="replace").splitlines():
            m = APPLIED.search(line)
            if m:
                self.applied.append((int(m.group(1)), int(m.group(2)), float(m.group(3))))

    def tail(self, n: int = 8) -> str:
        try:
            return " | ".join(self.path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


def _wait_applied(proc, alog: AgentLog, done, timeout: float, sample=None, interval: float = 0.05) -> None:
    """Until done(applies logged so far) holds; sample() every interval."""
    deadline = time.monotonic() + timeout
    while True:
        if sample:
            sample()
        alog.poll()
        if done(alog.applied):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited ({proc.returncode}): {alog.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no 'applied:' after {timeout:.0f} s: {alog.tail()}")
        time.sleep(interval)


def footprint_rows(big: BigState, idle_s: float, progress: Progress, workdir: Path) -> list[dict]:
    params = dict(big.describe(), idle_window_s=idle_s, sample_interval_s=0.05, trials_note="single trial")
    res: dict[str, object] = {}
    error = None
    inst = f"dpbench_ctl_{os.getpid()}_agent"
    lab = Lab(prefix=f"dpc{os.getpid() % 100000}")
    dp = None
    proc = None
    agent_log = workdir / "agent.log"
    try:
        check_privileges()
        check_bpffs()
        why = kernel_headers_present()
        if why:
            raise RuntimeError(why)
        ns_srv = lab.ns("srv")
        ns_cli = lab.ns("cli")
        _, if_srv = lab.link(ns_cli, ns_srv, ["10.250.0.1/24"], ["10.250.0.2/24"])
        # Loaded here with room for two generations of the big state; the agent adopts it.
        dp = Datapath(inst)
        policy_max = 1 << max(18, (2 * big.entries + 4096 - 1).bit_length())
        ipcache_max = 1 << max(18, (2 * big.prefixes + 4096 - 1).bit_length())
        dp.load(BuildOptions(pin_dir=dp.pin_dir, ipcache_max=ipcache_max, policy_max=policy_max))
        dp.close()
        params["datapath"] = {"ipcache_max": ipcache_max, "policy_max": policy_max, "attached": "xdp on a veth"}
        pol, inv = workdir / "agent-policy.yaml", workdir / "agent-inventory.yaml"
        pol.write_text(SMALL_POLICY)
        inv.write_text(SMALL_INVENTORY)
        with agent_log.open("w") as out:
            proc = subprocess.Popen(
                [str(CLI), "--instance", inst, "agent", "--policy", str(pol), "--inventory", str(inv),
                 "--interface", if_srv, "--netns", ns_srv, "--host", HOST, "--state-dir", str(workdir / "agent-ws"),
                 "--metrics", "127.0.0.1:0"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
        alog = AgentLog(agent_log)
        _wait_applied(proc, alog, lambda applied: applied, 120, interval=0.1)
        progress.step("agent up, small policy applied")

        # Idle: RSS after the small apply, CPU over the window.
        time.sleep(1.0)
        c0, w0 = _proc_ticks(proc.pid), time.monotonic()
        time.sleep(idle_s)
        c1, w1 = _proc_ticks(proc.pid), time.monotonic()
        res["idle_rss"] = _proc_mem_kib(proc.pid)["VmRSS"] / 1024
        res["idle_cpu"] = (c1 - c0) / CLK_TCK / (w1 - w0) * 100
        progress.step("agent idle measured")

        # The big state: both files replaced together (inventory first); samples every 50 ms.
        big_inv, big_pol = workdir / "big-inventory.yaml", workdir / "big-policy.yaml"
        big_inv.write_text(big_inventory_text(big))
        big_pol.write_text(big_policy_text(big))
        params["file_bytes"] = {"inventory": big_inv.stat().st_size, "policy": big_pol.stat().st_size}
        samples: list[tuple[float, int, int]] = []

        def sample():
            samples.append((time.monotonic(), _proc_ticks(proc.pid), _proc_mem_kib(proc.pid)["VmRSS"]))

        sample()
        t0 = time.monotonic()
        os.replace(big_inv, inv)
        os.replace(big_pol, pol)
        sample()
        # Should the agent catch the new inventory with the old policy, it applies
        # that first: wait for the state with both (counted in params).
        want = (big.entries, big.prefixes)
        _wait_applied(proc, alog, lambda applied: any(a[:2] == want for a in applied[1:]), 300, sample=sample)
        sample()
        t1 = time.monotonic()
        params["intermediate_applies"] = len(alog.applied) - 2
        ms = alog.applied[-1][2]
        mem = _proc_mem_kib(proc.pid)
        res["apply_s"] = t1 - t0
        res["apply_cpu"] = (samples[-1][1] - samples[0][1]) / CLK_TCK / (samples[-1][0] - samples[0][0]) * 100
        res["peak_rss"] = max(max(s[2] for s in samples), mem["VmHWM"]) / 1024
        params["apply_compiled_ms_logged"] = ms
        params["samples"] = len(samples)
        params["peak_rss_sampled_mib"] = round(max(s[2] for s in samples) / 1024, 1)
        params["vm_hwm_mib"] = round(mem["VmHWM"] / 1024, 1)
        # The busiest 1 s window of the samples, in % of one vCPU.
        best = 0.0
        j = 0
        for i in range(len(samples)):
            while samples[i][0] - samples[j][0] > 1.0:
                j += 1
            if samples[i][0] - samples[j][0] >= 0.5:
                best = max(best, (samples[i][1] - samples[j][1]) / CLK_TCK / (samples[i][0] - samples[j][0]) * 100)
        params["apply_cpu_busiest_1s_pct"] = round(best, 1)
        time.sleep(1.0)
        params["rss_1s_after_apply_mib"] = round(_proc_mem_kib(proc.pid)["VmRSS"] / 1024, 1)
        progress.step("agent big apply measured")
    except Exception as e:  # noqa: BLE001 - reported in the rows
        error = _err(e)
        log(f"footprint: {error}")
        traceback.print_exc(file=sys.stderr)
    finally:
        if proc is not None:
            try:
                _stop(proc)
            except Exception as e:  # noqa: BLE001
                log(f"stopping the agent: {e}")
        try:
            sock = Path(STATE_ROOT) / inst / "agent.sock"
            if sock.exists():
                sock.unlink()
            Datapath(inst).unload()
        except Exception as e:  # noqa: BLE001
            log(f"unload of {inst} failed: {e}")
        lab.close()

    size = f"{big.prefixes + big.entries:,} map entries per generation ({big.prefixes:,} prefixes + " \
           f"{big.entries:,} policy entries)"
    single = "single trial"

    def row(key, id_, name, unit, note, better="lower"):
        v = res.get(key)
        trials = [round(v, 3)] if isinstance(v, float) else ([error] if error else ["not measured"])
        return measured(FOOT, id_, name, unit, trials, better, params, note=note)

    return [
        row("idle_rss", "agent_idle_rss", "agent RSS, idle after applying a small policy (1 rule)", "MiB",
            f"{single}; VmRSS of the `dataplane agent` process, XDP on a veth, metrics on"),
        row("idle_cpu", "agent_idle_cpu", f"agent CPU, idle, over {idle_s:g} s", "% of a vCPU",
            f"{single}; utime+stime delta from /proc/<pid>/stat (tick {1000 // CLK_TCK} ms); polls its files "
            f"every 0.5 s"),
        row("peak_rss", "agent_apply_peak_rss", f"agent peak RSS while applying {size}", "MiB",
            f"{single}; max of VmRSS sampled every 50 ms and VmHWM"),
        row("apply_cpu", "agent_apply_cpu", f"agent CPU while applying {size}", "% of a vCPU",
            f"{single}; mean from the file rewrite to the 'applied:' log line"),
        row("apply_s", "agent_apply_time", f"agent: files rewritten -> 'applied:' logged, {size}", "s",
            f"{single}; includes up to 0.5 s until its file poll notices, parse, compile, apply, record"),
    ]


# --- the run -------------------------------------------------------------------------------------

def run(quick: bool, progress: Progress, footprint: str | None = None) -> list[dict]:
    """footprint: the agent's large state, a key of BIG_STATES (default 1m, 100k with quick)."""
    trials = 3 if quick else 5
    sizes = QUICK if quick else FULL
    big = BIG_STATES[footprint or (QUICK_BIG if quick else FULL_BIG)]
    idle_s = 5.0 if quick else 10.0
    progress.add(1 + 3 * trials + 3)
    with tempfile.TemporaryDirectory(prefix="dpbench_ctl_") as tmp:
        workdir = Path(tmp)
        rows = control_rows(sizes, trials, progress, workdir)
        rows += footprint_rows(big, idle_s, progress, workdir)
    return rows


def _num(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "updates/s":
        return f"{v:,.0f}"
    if unit == "x":
        return f"{v:.2f}"
    if unit in ("MiB", "% of a vCPU"):
        return f"{v:.1f}"
    return f"{v:.3f}"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"### Control plane and agent footprint ({'quick' if report['settings']['quick'] else 'full'} run)",
        "",
        (f"{m['cpu_model']}, {m['vcpus']} vCPUs, kernel {m['kernel']}, {m['date']}; load average at start "
         f"{(m['loadavg_start'] or '?').split(' ')[0]}, at end {(report.get('loadavg_end') or '?').split(' ')[0]}. "
         "Median [min-max] of the trials."),
        "",
        "| group | id | figure | unit | median | min | max | trials | target | note |",
        "|---|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in report["rows"]:
        ok = sum(isinstance(x, (int, float)) for x in r.get("trials", []))
        target = ""
        if r.get("target_text"):
            target = f"{r['target_text']}: " + {True: "met", False: "NOT met", None: "-"}[r.get("met")]
        note = f"ERROR: {r['error']}" if r.get("error") else r.get("note", "")
        lines.append(f"| {r['group']} | {r['id']} | {r['name']} | {r['unit']} | {_num(r['median'], r['unit'])} | "
                     f"{_num(r['min'], r['unit'])} | {_num(r['max'], r['unit'])} | "
                     f"{ok}/{len(r.get('trials', []))} | {target} | {note} |")
    lines += ["", f"Total run time {report['elapsed_s']:.0f} s."]
    return "\n".join(lines)


def _on_term(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 3 trials, 25k entries, ~100k-entry agent state (results to control.quick.json)")
    ap.add_argument("--footprint", choices=sorted(BIG_STATES),
                    help=f"the agent's large state in map entries per generation (default {FULL_BIG}, "
                         f"--quick {QUICK_BIG})")
    ap.add_argument("--out", type=Path, help="JSON output path")
    args = ap.parse_args(argv)
    out = args.out or RESULTS_DIR / ("control.quick.json" if args.quick else "control.json")
    signal.signal(signal.SIGTERM, _on_term)
    started = time.monotonic()
    info = machine()
    progress = Progress(0)
    try:
        rows = run(args.quick, progress, args.footprint)
    except KeyboardInterrupt:
        progress.close()
        log("interrupted; everything started was cleaned up, nothing written")
        return 130
    progress.step("done")
    progress.close()
    sizes = QUICK if args.quick else FULL
    big = BIG_STATES[args.footprint or (QUICK_BIG if args.quick else FULL_BIG)]
    report = {
        "benchmark": "control",
        "format": 1,
        "machine": info,
        "settings": {"quick": args.quick, "trials": 3 if args.quick else 5, "sizes": sizes.describe(),
                     "footprint_state": big.describe(), "apply_target_s": APPLY_TARGET_S, "updates": UPDATES},
        "rows": rows,
        "elapsed_s": round(time.monotonic() - started, 1),
        "loadavg_end": Path("/proc/loadavg").read_text().strip(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    print(markdown(report))
    print(f"\n(JSON: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out})")
    return 1 if any(r.get("error") and r.get("unit") != "x" and not r["id"].endswith("_target")
                    for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
