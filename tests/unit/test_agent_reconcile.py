"""The standalone agent never compiles a policy with an inventory it read
before or after a change to either file: when a file changes while the two
are being read, it reads both again at the next poll."""

from __future__ import annotations

import types
from pathlib import Path

from dataplane import agent as agent_mod
from dataplane.agent import Agent, AgentOptions

ROOT = Path(__file__).resolve().parents[2]


def test_a_file_changing_while_read_is_read_again(tmp_path, monkeypatch):
    policy, inventory = tmp_path / "policy.yaml", tmp_path / "inventory.yaml"
    policy.write_text((ROOT / "examples/policy.yaml").read_text())
    inventory.write_text((ROOT / "examples/inventory.yaml").read_text())
    a = Agent(types.SimpleNamespace(instance="t"), AgentOptions(str(policy), str(inventory), [],
                                                                state_dir=str(tmp_path / "ws")))
    real_load = agent_mod.load_sources
    calls, applied = [], []

    def load_while_a_writer_replaces_the_inventory(p, i):
        out = real_load(p, i)
        if not calls:
            inventory.write_text(inventory.read_text() + "\n# changed\n")
        calls.append(1)
        return out

    monkeypatch.setattr(agent_mod, "load_sources", load_while_a_writer_replaces_the_inventory)
    monkeypatch.setattr(agent_mod, "apply_compiled", lambda *args, **kw: applied.append(args) or
                        types.SimpleNamespace(generation=1, epoch=1))
    monkeypatch.setattr(agent_mod, "names_of", lambda *args: None)
    assert a.reconcile() is False and applied == []          # mixed read: nothing applied
    assert a.reconcile() is True and len(applied) == 1        # next poll: both read again, applied
    assert len(calls) == 2
    assert a.reconcile() is False and len(calls) == 2         # nothing changed since: not even read
