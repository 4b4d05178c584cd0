#!/usr/bin/env python3
"""Records how big each program is after verification, so growth shows up in
review: bpf/insn_counts.json holds, per program, the instructions the
verifier processed (its cost, limit 1,000,000), the translated instructions
and the JIT image size. `--write` loads the programs and rewrites the file;
without it, prints the current figures next to the recorded ones."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loader.instance import HOOKS, Datapath  # noqa: E402

RECORD = Path(__file__).resolve().parents[1] / "bpf" / "insn_counts.json"
FIELDS = ("verified_insns", "xlated_insns", "jited_bytes")


def measure() -> dict:
    dp = Datapath(f"insncount{os.getpid()}")
    try:
        dp.load()
        return figures(dp)
    finally:
        dp.unload()


def figures(dp) -> dict:
    return {h: {f: dp.program_info(h)[f] for f in FIELDS} for h in HOOKS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    now = measure()
    if args.write:
        RECORD.write_text(json.dumps(now, indent=2, sort_keys=True) + "\n")
        print(f"wrote {RECORD}")
    recorded = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    for hook in HOOKS:
        for f in FIELDS:
            old = recorded.get(hook, {}).get(f)
            print(f"{hook:<12} {f:<15} {now[hook][f]:>8}  (recorded {old})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
