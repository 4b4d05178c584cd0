#!/usr/bin/env python3
"""The benchmark suite: `make bench`.

    .venv/bin/python bench/suite.py            # everything, < 15 minutes on 2 vCPUs
    .venv/bin/python bench/suite.py --quick    # smoke run, a few minutes
    .venv/bin/python bench/suite.py --only perpacket,live

Parts (bench/README.md explains each method):
  perpacket  ns per packet through BPF_PROG_TEST_RUN (bench/datapath_ns.py)
  live       Mpps through a veth from a live-frames XDP generator, against
             iptables (nft and legacy), nftables sets and verdict maps, ipset (bench/live.py)
  control    compile and apply of large policies, incremental apply, map
             update rates; agent footprint (bench/control.py)
  fleet      a revision reaching 10, 100 and 1000 agents; revocation to the
             first dropped packet (bench/fleet.py)

Writes bench/results/latest.json (every trial, the machine, the settings),
bench/results/latest.md (the report) and PNG plots under bench/results/,
and prints the table. A part that cannot run says why in its rows; the
others still run. Exit status 1 when any row has an error.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
from common import Progress, missing, ratio  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PARTS = ("perpacket", "live", "control", "fleet")


# --- per-packet ----------------------------------------------------------------------

def _size_label(n: int) -> str:
    for unit, label in ((1 << 20, "M"), (1 << 10, "k")):
        if n % unit == 0:
            return f"{n // unit}{label}"
    return str(n)


_LOG = None


def _file_log(msg: str) -> None:
    """The parts' progress lines go to bench/results/latest.log; the terminal shows the bar."""
    if _LOG is not None:
        _LOG.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        _LOG.flush()


def _quiet(module):
    if hasattr(module, "log"):
        module.log = _file_log
    return module


def perpacket(quick: bool, progress: Progress) -> tuple[list[dict], dict]:
    import datapath_ns as dn

    _quiet(dn)
    sizes = [1 << 10, 1 << 16] if quick else [1 << 10, 1 << 17, 1 << 20]
    want = set(dn.GROUPS)
    s = dn.Settings(10 ** 5 if quick else 10 ** 6, 3 if quick else 5, warmup=(10 ** 4 if quick else 10 ** 5))
    progress.add(1 + 1 + len(dn.FLOWS) * len(sizes) * 2)
    missing_headers = dn.kernel_headers_present()
    if missing_headers:
        return [missing("perpacket", "perpacket", "per-packet cost", "ns", missing_headers)], {}
    report = dn.collect(sizes, want, s, quick, progress=progress.step)
    rows = []
    for r in report["rows"]:
        trials = [t["ns"] if "ns" in t else t.get("error", "failed") for t in r.get("trials", [])]
        name = r["figure"]
        if r.get("kind") == "enforcement" and r.get("flow") != "parse":
            name += f", {r['identity']} identity"
        if r.get("entries") and r.get("flow") != "parse":
            name += f", N={_size_label(r['entries'])}"
        rows.append(common.measured("perpacket", r["id"], name, "ns", trials, "lower",
                                    {"entries": r.get("entries"), "identity": r.get("identity"),
                                     "flow": r.get("flow"), "program": r.get("program"),
                                     "path": r.get("path"), "warnings": r.get("warnings")},
                                    error=r.get("error") if not trials else None))
    by = {r["id"]: r for r in rows}
    big, small = sizes[-1], sizes[0]
    for n in sizes:
        rows.append(ratio("perpacket", f"ratio_est_lookup_{n}",
                          f"established / one bare hash lookup (same key, same map size), N={_size_label(n)}",
                          by.get(f"established_hash_{n}"), by.get(f"lookup_ct_{n}"), target=1.3,
                          target_text="<= 1.3x", higher_is_better=False))
    for flow in ("new", "denied"):
        rows.append(ratio("perpacket", f"ratio_lpm_hash_{flow}_{big}",
                          f"{flow}: LPM-trie identity / chosen (hash) identity, N={_size_label(big)}",
                          by.get(f"{flow}_lpm_{big}"), by.get(f"{flow}_hash_{big}"), target=3.0,
                          target_text=">= 3x"))
    # Growth from the smallest to the largest size, against the bare lookup's own growth.
    for flow in ("established", "new", "denied"):
        ours = ratio("perpacket", "", "", by.get(f"{flow}_hash_{big}"), by.get(f"{flow}_hash_{small}"))
        base = ratio("perpacket", "", "", by.get(f"lookup_ct_{big}"), by.get(f"lookup_ct_{small}"))
        row = ratio("perpacket", f"growth_{flow}",
                    f"{flow}: growth {_size_label(small)}->{_size_label(big)} / bare lookup's growth",
                    {"id": f"growth {flow}", "median": ours["median"]},
                    {"id": "growth lookup", "median": base["median"]}, target=1.0,
                    target_text="<= 1.0 (no worse than the map's own growth)", higher_is_better=False)
        rows.append(row)
    return rows, {"settings": report.get("settings"), "elapsed_s": report.get("elapsed_s")}


# --- parts from their own modules ----------------------------------------------------------

def part(name: str, quick: bool, progress: Progress) -> tuple[list[dict], dict]:
    if name == "perpacket":
        return perpacket(quick, progress)
    if name == "live":
        import live
        return _quiet(live).run(quick, progress), {}
    if name == "control":
        import control
        return _quiet(control).run(quick, progress), {}
    if name == "fleet":
        import fleet
        return _quiet(fleet).run(quick, progress), {}
    raise ValueError(name)


# --- report -------------------------------------------------------------------------

def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "x":
        return f"{v:.2f}x"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


GROUP_TITLES = {
    "perpacket": "Per-packet cost (BPF_PROG_TEST_RUN, random keys)",
    "live": "Live throughput through veth (live-frames XDP generator)",
    "control": "Control plane",
    "footprint": "Agent footprint",
    "fleet": "Fleet",
}


LIMITS = """\
- One small VM (2 vCPUs): the generator, the program under test and the
  baselines share the CPUs; figures are comparable within a run, not
  across machines. Load averages at start and end are recorded.
- Per-packet figures come from BPF_PROG_TEST_RUN: no driver, no DMA, the
  frame in cache. They are the program's own cost, a lower bound for live
  traffic. Keys are random and uniform over N; real traffic is skewed to
  hot flows, which is cheaper at large N.
- Live throughput runs through veth in network namespaces, not a NIC:
  XDP on veth runs in the veth's NAPI context after a frame was redirected
  into it; iptables/nftables rows include the network stack up to their
  hook. The generator is a live-frames test run on one CPU.
- Fleet figures use lightweight agents (the agent protocol without a
  datapath) in one process next to the controller; a real fleet spreads
  that load over many machines.
- Sizes are powers of two: 128k is 131,072 entries, 1M is 1,048,576.
"""


def table(rows: list[dict]) -> str:
    out = []
    groups = []
    for r in rows:
        if r["group"] not in groups:
            groups.append(r["group"])
    for g in groups:
        out += [f"### {GROUP_TITLES.get(g, g)}", "",
                "| figure | median | min | max | unit | trials | target |", "|---|---:|---:|---:|---|---:|---|"]
        for r in rows:
            if r["group"] != g:
                continue
            if r.get("error") and r.get("median") is None:
                out.append(f"| {r['name']} | - | - | - | {r['unit']} | - | not measured: {r['error']} |")
                continue
            n_ok = sum(isinstance(t, (int, float)) for t in r.get("trials", []))
            n_all = len(r.get("trials", []))
            target = ""
            if r.get("target_text"):
                target = f"{r['target_text']}: {'met' if r.get('met') else 'NOT met'}"
            note = f" ({r['note']})" if r.get("note") else ""
            out.append(f"| {r['name']}{note} | {_fmt(r['median'], r['unit'])} | {_fmt(r.get('min'), r['unit'])} | "
                       f"{_fmt(r.get('max'), r['unit'])} | {r['unit']} | {f'{n_ok}/{n_all}' if n_all else '-'} | "
                       f"{target} |")
        out.append("")
    return "\n".join(out)


def targets(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("target_text")]


def write_report(report: dict, plots: list[Path]) -> str:
    m = report["machine"]
    head = [
        f"# Benchmark report ({m['date'][:10]})",
        "",
        f"Machine: {m['cpu_model']}, {m['vcpus']} vCPUs, {m.get('memory_mib')} MiB, kernel {m['kernel']}, "
        f"BPF JIT {'on' if m.get('bpf_jit_enable') == 1 else m.get('bpf_jit_enable')}; "
        f"commit {((m.get('git') or {}).get('commit') or '?')[:12]}"
        f"{' with uncommitted changes' if (m.get('git') or {}).get('uncommitted') else ''}; "
        f"load average at start {m.get('loadavg_start')}, at end {report.get('loadavg_end')}.",
        f"{'Quick (smoke) run: fewer trials and repetitions. ' if report['quick'] else ''}"
        f"Each figure is the median of its trials (>= 5 in a full run) with min and max; ratios are taken "
        f"between medians of the same run. Run time {report['elapsed_s']:.0f} s. Method: bench/README.md.",
        "",
    ]
    t = targets(report["rows"])
    if t:
        head += ["## Targets", "", "| target | figure | value | met |", "|---|---|---:|---|"]
        for r in t:
            head.append(f"| {r['target_text']} | {r['name']} | {_fmt(r['median'], r['unit'])} "
                        f"{'' if r['unit'] == 'x' else r['unit']} | "
                        f"{'yes' if r.get('met') else ('no' if r.get('met') is False else 'not measured')} |")
        head.append("")
    for p in plots:
        head += [f"![{p.stem}]({p.name})", ""]
    head += ["## All figures", "", table(report["rows"]), "## Limits", "", LIMITS]
    return "\n".join(head)


README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def update_readme(report: dict, made: list[Path]) -> bool:
    """A full run rewrites the README's benchmark block (between the markers)."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    m = report["machine"]
    lines = [README_BEGIN,
             f"Latest full run, {m['date'][:10]}: {m['cpu_model']}, {m['vcpus']} vCPUs, kernel {m['kernel']}, "
             f"BPF JIT {'on' if m.get('bpf_jit_enable') == 1 else m.get('bpf_jit_enable')} "
             f"(`make bench`, {report['elapsed_s'] / 60:.0f} min; full report: "
             "[bench/results/latest.md](bench/results/latest.md)).", ""]
    t = targets(report["rows"])
    if t:
        lines += ["| target | figure | value | met |", "|---|---|---:|---|"]
        for r in t:
            lines.append(f"| {r['target_text']} | {r['name']} | {_fmt(r['median'], r['unit'])}"
                         f"{'' if r['unit'] == 'x' else ' ' + r['unit']} | "
                         f"{'yes' if r.get('met') else ('no' if r.get('met') is False else 'not measured')} |")
        lines.append("")
    main_plot = next((p for p in made if p.stem == "live_throughput"), made[0] if made else None)
    if main_plot is not None:
        lines += [f"![{main_plot.stem}]({main_plot.relative_to(ROOT)})", ""]
    lines.append(README_END)
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + "\n".join(lines) + text[end:])
    return True


def plots(report: dict, out_dir: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"suite: no plots ({e}; `make setup` installs python3-matplotlib)", file=sys.stderr)
        return []
    rows = report["rows"]
    made = []
    m = report["machine"]
    subtitle = f"{m['date'][:10]} · {m['cpu_model']} · {m['vcpus']} vCPUs · kernel {m['kernel']}"

    # Live throughput against the number of rules/elements, per tool.
    live = [r for r in rows if r["group"] == "live" and r.get("params", {}).get("n") and r.get("median") is not None]
    if live:
        fig, ax = plt.subplots(figsize=(8, 5))
        tools = {}
        for r in live:
            tools.setdefault(r["params"].get("tool", r["name"]), []).append(r)
        for tool, rs in sorted(tools.items()):
            rs.sort(key=lambda r: r["params"]["n"])
            ax.errorbar([r["params"]["n"] for r in rs], [r["median"] for r in rs],
                        yerr=[[r["median"] - r["min"] for r in rs], [r["max"] - r["median"] for r in rs]],
                        marker="o", capsize=3, label=tool)
        by_id = {r["id"]: r for r in rows if r["group"] == "live" and r.get("median") is not None}
        for rid, label, style in (("live_dp_denied", "this project (XDP), one denied flow", ("tab:red", "-", 2.5)),
                                  ("live_dp_denied_10k_src", "this project (XDP), 10k denied sources",
                                   ("tab:red", "--", 1.5)),
                                  ("live_xdp_drop", "empty XDP program (XDP_DROP): the ceiling", ("grey", ":", 1.5)),
                                  ("live_noprog", "no rules at all: the stack drops it", ("black", "-.", 1))):
            if rid in by_id:
                color, ls, lw = style
                ax.axhline(by_id[rid]["median"], color=color, linestyle=ls, linewidth=lw, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rules / set elements before the deciding one (N)")
        ax.set_ylabel("Mpps (denied traffic, log)")
        ax.set_title("Denied traffic through a veth: packets per second\n" + subtitle, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        p = out_dir / "live_throughput.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)

    # Per-packet cost by case and size, hash vs LPM identity.
    pp = {r["id"]: r for r in rows if r["group"] == "perpacket" and r["unit"] == "ns" and r.get("median")}
    sizes = sorted({r["params"]["entries"] for r in pp.values() if r["params"].get("entries")
                    and r["params"].get("flow") not in (None, "parse")})
    if sizes:
        fig, ax = plt.subplots(figsize=(8, 5))
        cases = [("established", "hash"), ("new", "hash"), ("new", "lpm"), ("denied", "hash"), ("denied", "lpm")]
        width = 0.8 / (len(cases) + 1)
        for i, (flow, ident) in enumerate(cases):
            vals = [pp.get(f"{flow}_{ident}_{n}", {}).get("median") or 0 for n in sizes]
            ax.bar([x + i * width for x in range(len(sizes))], vals, width, label=f"{flow} ({ident} identity)")
        vals = [pp.get(f"lookup_ct_{n}", {}).get("median") or 0 for n in sizes]
        ax.bar([x + len(cases) * width for x in range(len(sizes))], vals, width, label="bare hash lookup",
               color="grey")
        ax.set_xticks([x + width * len(cases) / 2 for x in range(len(sizes))])
        ax.set_xticklabels([f"N={_size_label(n)}" for n in sizes])
        ax.set_ylabel("ns per packet (median)")
        ax.set_title("Per-packet cost, BPF_PROG_TEST_RUN, random keys\n" + subtitle, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        p = out_dir / "perpacket.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)

    fl = [r for r in rows if r["group"] == "fleet" and r.get("params", {}).get("agents") and r.get("median")]
    if fl:
        fig, ax = plt.subplots(figsize=(6, 4))
        fl.sort(key=lambda r: r["params"]["agents"])
        ax.errorbar([r["params"]["agents"] for r in fl], [r["median"] for r in fl],
                    yerr=[[r["median"] - r["min"] for r in fl], [r["max"] - r["median"] for r in fl]],
                    marker="o", capsize=3)
        ax.set_xscale("log")
        ax.set_xlabel("agents")
        ax.set_ylabel(f"policy change -> all applied ({fl[0]['unit']})")
        ax.set_title("Fleet propagation through one controller\n" + subtitle, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        p = out_dir / "fleet.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run (results to bench/results/quick/)")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    args = ap.parse_args(argv)
    want = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(want) - set(PARTS)
    if unknown:
        ap.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    out_dir = RESULTS / "quick" if args.quick else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.monotonic()
    report = {"suite": "zt-dataplane", "format": 1, "quick": args.quick, "parts": want,
              "machine": common.machine(), "rows": [], "details": {}}
    global _LOG
    _LOG = (out_dir / "latest.log").open("w")
    progress = Progress(0)
    interrupted = False
    try:
        if not common.is_root():
            for name in want:
                report["rows"].append(missing(name, name, name, "-", "needs root (BPF, namespaces, iptables)"))
        else:
            for i, name in enumerate(want, 1):
                progress.close()
                progress = Progress(0, prefix=f"part {i}/{len(want)} {name}")
                progress.note("starting")
                try:
                    rows, details = part(name, args.quick, progress)
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - one part failing must not stop the others
                    traceback.print_exc(file=sys.stderr)
                    rows, details = [missing(name, name, f"{name} (the part crashed)", "-",
                                             f"{type(e).__name__}: {e}")], {}
                report["rows"] += rows
                report["details"][name] = details
    except KeyboardInterrupt:
        interrupted = True
        print("\nsuite: interrupted; writing what was measured", file=sys.stderr)
    finally:
        progress.close()
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
    report["interrupted"] = interrupted
    _LOG.close()

    made = plots(report, out_dir)
    (out_dir / "latest.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = write_report(report, made)
    (out_dir / "latest.md").write_text(text + "\n")
    if not args.quick and not interrupted and set(want) == set(PARTS):
        update_readme(report, made)
    print(text)
    rel = out_dir.relative_to(ROOT)
    print(f"\n(written: {rel}/latest.json, {rel}/latest.md" + "".join(f", {rel}/{p.name}" for p in made) + ")")
    if interrupted:
        return 130
    return 1 if any(r.get("error") for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
