"""The programs' verified size must match bpf/insn_counts.json, so that any
growth is a reviewed change (`make insn-counts` rewrites the file)."""

import json

from loader.instance import HOOKS
from scripts.insn_counts import FIELDS, RECORD


def test_program_sizes_match_the_recorded_figures(loaded_datapath):
    recorded = json.loads(RECORD.read_text())
    for hook in HOOKS:
        info = loaded_datapath.program_info(hook)
        now = {f: info[f] for f in FIELDS}
        assert now == recorded[hook], (
            f"{hook}: programs changed size ({now} vs recorded {recorded[hook]}); "
            f"run `make insn-counts` and commit bpf/insn_counts.json with the change")


def test_verifier_cost_leaves_headroom(loaded_datapath):
    for hook in HOOKS:
        assert loaded_datapath.program_info(hook)["verified_insns"] < 500_000, hook
