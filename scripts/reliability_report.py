"""Turns the figures of a `make soak` run into docs/reliability.md's tables.

    .venv/bin/python scripts/reliability_report.py build/reliability            # print
    .venv/bin/python scripts/reliability_report.py build/reliability --write docs/reliability.md

Every reliability test writes NAME.json (tests/reliability.py). This script
writes the headline totals and one table per test between the markers
`<!-- reliability:begin -->` and `<!-- reliability:end -->`; the rest of
the document is prose and stays as it is. A figure a test did not produce
is not invented: its row says "not recorded".
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402

BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"

# Headline rows: (label, record names, figure key); summed over the records named.
HEADLINE = (
    ("frames fuzzed (each through all three programs)", ("packet_fuzz",), "frames"),
    ("program runs (BPF_PROG_TEST_RUN)", ("packet_fuzz",), "runs"),
    ("runs where the kernel passed what the model denies", ("packet_fuzz",), "false_passes"),
    ("runs where the kernel dropped what the model passes", ("packet_fuzz",), "false_drops"),
    ("states applied part-way through a fuzz batch (epoch bumps)", ("packet_fuzz",), "states_applied_mid_batch"),
    ("established flows judged again and kept / revoked, as the model says", ("packet_fuzz",), "rejudged_kept"),
    ("", ("packet_fuzz",), "revoked"),
    ("policy documents tried", ("policy_fuzz",), "documents"),
    ("policy documents ending in a traceback", ("policy_fuzz",), "tracebacks"),
    ("refused documents applied to real maps (located + capacity)", ("policy_fuzz_apply",), "located_errors"),
    ("", ("policy_fuzz_apply",), "capacity_refusals"),
    ("agent kills during a 68k-entry apply", ("fault_kill_apply",), "kills"),
    ("mixed states seen after those kills", ("fault_kill_apply",), "mixed_states"),
    ("agent kills and restarts during a flood", ("fault_restart_flood",), "restarts"),
    ("packets sent during those restarts (allowed + denied)", ("fault_restart_flood",), "allowed_sent"),
    ("", ("fault_restart_flood",), "denied_sent"),
    ("packets misjudged during those restarts", ("fault_restart_flood",), "misjudged"),
    ("conntrack filled to capacity (entries, both families)", ("conntrack_full_ipv4", "conntrack_full_ipv6"),
     "filled"),
    ("established packets passed with the table full", ("conntrack_full_ipv4", "conntrack_full_ipv6"),
     "established_packets_passed"),
    ("denied packets in the ring-overflow flood", ("ring_overflow",), "denied_packets"),
    ("flow events neither read nor counted lost", ("ring_overflow",), "unaccounted_events"),
    ("etcd leader killed: failover (s)", ("etcd_leader_killed",), "failover_s"),
    ("controller pushes refused by the control-channel failsafe", ("control_failsafe",), "pushes_refused"),
)


def load(directory: pathlib.Path) -> dict[str, dict]:
    out = {}
    for path in sorted(directory.glob("*.json")):
        doc = json.loads(path.read_text())
        out[doc["name"]] = doc
    return out


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0])))
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def render(records: dict[str, dict], info: dict) -> str:
    lines = [f"Run of {info['date']}, commit {(info.get('git') or {}).get('commit', '?')[:12]}, "
             f"{info.get('cpu_model')}, {info.get('vcpus')} vCPUs, kernel {info.get('kernel')}.", "",
             "| what | figure |", "|---|---:|"]
    # A row with an empty label continues the row above it: its figure is added
    # to it, or shown beside it where the label reads "a / b".
    rows: list[list] = []
    for label, names, key in HEADLINE:
        values = [records[n]["figures"][key] for n in names if n in records and key in records[n]["figures"]]
        if label or not rows:
            rows.append([label, [values]])
        else:
            rows[-1][1].append(values)
    for label, parts in rows:
        if any(not values for values in parts):
            text = "not recorded"
        elif " / " in label:
            text = " / ".join(_fmt(sum(values)) for values in parts)
        else:
            text = _fmt(sum(sum(values) for values in parts))
        lines.append(f"| {label} | {text} |")
    for name, doc in sorted(records.items()):
        lines += ["", f"**{name}**", "", "| figure | value |", "|---|---|"]
        for key, value in sorted(doc["figures"].items()):
            lines.append(f"| {key} | {_fmt(value)} |")
    return "\n".join(lines) + "\n"


def write(doc_path: pathlib.Path, block: str) -> None:
    text = doc_path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc_path}: markers {BEGIN} / {END} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc_path.write_text(f"{head}{BEGIN}\n{block}{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("directory", type=pathlib.Path)
    ap.add_argument("--write", type=pathlib.Path, help="document whose reliability block to rewrite")
    args = ap.parse_args(argv)
    if not args.directory.is_dir():
        print(f"{args.directory}: no such directory (run `make soak`)", file=sys.stderr)
        return 2
    records = load(args.directory)
    if not records:
        print(f"{args.directory}: no figures recorded", file=sys.stderr)
        return 2
    block = render(records, machine())
    if args.write:
        write(args.write, block)
        print(f"wrote {len(records)} records into {args.write}")
    else:
        sys.stdout.write(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
