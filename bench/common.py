"""Shared pieces of the benchmark suite (bench/suite.py, `make bench`).

Every part of the suite returns a list of rows in one schema:

    {"group": "live", "id": "live_ipt_nft_deny_1000", "name": "iptables-nft, 1k rules, denied",
     "unit": "Mpps", "better": "higher", "median": 0.01, "min": ..., "max": ..., "trials": [...],
     "params": {...}, "error": None, "note": ""}

- a measured row: `measured(...)` from the values of its trials (>= 5 in a
  full run); a trial that failed is kept as an error string in `trials` and
  the row still reports the others; a row that could not run at all
  (missing tool, not root, kernel feature absent) has `error` set to one
  line saying why and no figures;
- a ratio row: `ratio(...)` of two measured rows' medians, taken in the
  same run, pair by pair (unit "x"), with `target` when the suite has one.
"""

from __future__ import annotations

import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measured(group: str, id_: str, name: str, unit: str, trials: list, better: str = "lower",
             params: dict | None = None, note: str = "", error: str | None = None) -> dict:
    values = [t for t in trials if isinstance(t, (int, float))]
    failed = [t for t in trials if not isinstance(t, (int, float))]
    row = {"group": group, "id": id_, "name": name, "unit": unit, "better": better, "params": params or {},
           "trials": trials, "note": note, "error": error, "median": None, "min": None, "max": None}
    if values and not error:
        row.update(median=statistics.median(values), min=min(values), max=max(values))
    if failed and not error:
        row["note"] = (note + "; " if note else "") + f"{len(failed)} of {len(trials)} trials failed: {failed[0]}"
    if not values and not error:
        row["error"] = f"every trial failed: {failed[0]}" if failed else "no trial ran"
    return row


def missing(group: str, id_: str, name: str, unit: str, why: str, better: str = "lower",
            params: dict | None = None) -> dict:
    return measured(group, id_, name, unit, [], better, params, error=why)


def ratio(group: str, id_: str, name: str, num: dict | None, den: dict | None, target: float | None = None,
          target_text: str = "", higher_is_better: bool = True) -> dict:
    """num.median / den.median; `met` compares with target when given."""
    row = {"group": group, "id": id_, "name": name, "unit": "x", "better": "higher" if higher_is_better else "lower",
           "numerator": num["id"] if num else None, "denominator": den["id"] if den else None,
           "median": None, "min": None, "max": None, "trials": [], "params": {}, "note": "", "error": None,
           "target": target, "target_text": target_text, "met": None}
    a = num.get("median") if num else None
    b = den.get("median") if den else None
    if a is None or b is None or not b:
        row["error"] = "missing: " + ", ".join(x["id"] + (f" ({x['error']})" if x.get("error") else "")
                                               for x in (num, den) if x and x.get("median") is None) \
            if (num and den) else "missing operand"
        return row
    row["median"] = a / b
    if target is not None:
        row["met"] = row["median"] >= target if higher_is_better else row["median"] <= target
    return row


def target_row(group: str, id_: str, name: str, value_row: dict | None, target: float, unit: str,
               lower_is_better: bool = True, key: str = "median") -> dict:
    """A measured figure against an absolute target (e.g. apply time < 2 s)."""
    v = value_row.get(key) if value_row else None
    row = {"group": group, "id": id_, "name": name, "unit": unit, "better": "lower" if lower_is_better else "higher",
           "median": v, "min": None, "max": None, "trials": [], "params": {}, "note": "",
           "error": None if v is not None else f"missing: {value_row.get('error') if value_row else 'no row'}",
           "target": target, "target_text": f"{'<' if lower_is_better else '>='} {target:g} {unit}",
           "met": None if v is None else (v < target if lower_is_better else v >= target)}
    return row


class Progress:
    """A one-line progress bar on stderr (a line per step when not a terminal)."""

    def __init__(self, total: int, stream=None, prefix: str = ""):
        self.prefix = prefix
        self.total = max(1, total)
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self.label = ""

    def add(self, n: int) -> None:
        self.total = n if self.done == 0 and self.total == 1 else self.total + n

    def step(self, label: str, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self.label = label
        self.show()

    def note(self, label: str) -> None:
        self.label = label
        self.show()

    def show(self) -> None:
        width = 30
        filled = int(width * self.done / self.total)
        elapsed = time.monotonic() - self.t0
        line = (f"{self.prefix + ' ' if self.prefix else ''}[{'#' * filled}{'.' * (width - filled)}] "
                f"{self.done}/{self.total} "
                f"{int(elapsed) // 60}:{int(elapsed) % 60:02d}  {self.label}")
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def machine() -> dict:
    def read(path):
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    cpu = None
    for line in (read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = None
    for line in (read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) // 1024
    jit = read("/proc/sys/net/core/bpf_jit_enable")
    u = os.uname()
    return {
        "cpu_model": cpu,
        "vcpus": os.cpu_count(),
        "memory_mib": mem,
        "kernel": u.release,
        "bpf_jit_enable": int(jit) if jit is not None and jit.isdigit() else jit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": read("/proc/loadavg"),
        "python": sys.version.split()[0],
        "git": git_info(),
    }


def git_info() -> dict | None:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "bpf", "loader",
                                  "dataplane", "bench"], capture_output=True, text=True, check=True).stdout.splitlines()
        return {"commit": commit, "uncommitted": [line.strip() for line in changed]}
    except (OSError, subprocess.CalledProcessError):
        return None


def is_root() -> bool:
    return os.geteuid() == 0
