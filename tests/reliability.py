"""Figures the reliability tests produce, for docs/reliability.md.

Each reliability test calls `record(name, figures)` with what it tried and
what it found (packets fuzzed, faults injected, misjudged packets...). The
figures are always printed; when DATAPLANE_RELIABILITY_DIR is set (`make
soak` sets it) they are also written there as NAME.json, and
scripts/reliability_report.py turns that directory into the tables of
docs/reliability.md.

Sizes: tests read their size from an environment knob through `size()`,
with a reduced default for `make test`; `make soak` raises them all.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import time


def size(knob: str, default: int) -> int:
    """An integer size from the environment (DATAPLANE_*), else default."""
    text = os.environ.get(knob, "").strip()
    if not text:
        return default
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise ValueError(f"{knob}={text!r}: not an integer") from None
    if value < 1:
        raise ValueError(f"{knob}={text!r}: must be at least 1")
    return value


def record(name: str, figures: dict) -> None:
    """Prints the figures and, under `make soak`, writes them as NAME.json."""
    print(f"reliability {name}: {json.dumps(figures, sort_keys=True, default=str)}")
    out_dir = os.environ.get("DATAPLANE_RELIABILITY_DIR")
    if not out_dir:
        return
    path = pathlib.Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    doc = {"name": name, "figures": figures, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "kernel": platform.release()}
    tmp = path / f".{name}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path / f"{name}.json")
