"""The agent on a host, standalone mode: enforce a policy and an inventory
read from files, and keep enforcing them as they change.

    dataplane agent --policy P --inventory I --interface IF [--netns NS] [--host NAME]

It loads (or adopts) the datapath, attaches it, compiles the policy for
this host and applies it atomically (loader.tables.apply_state). It
applies again when either file changes (checked twice a second, or at once
on SIGHUP) and when the compiled state changes by itself (a rule's validity
window opens or closes, a session expires). A file that does not parse or a
policy that does not fit is reported and the state in force stays. On exit
(SIGTERM, SIGINT) the datapath keeps enforcing the last state: restarting
the agent adopts it.

The workspace (/var/lib/dataplane/<instance>/ unless --state-dir) keeps the
identity and rule numbering, so that numbers survive restarts, and a record
of what was applied, for `policy show`, `identity list` and `bpf policy list`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from dataplane.compiler import CompiledState, Compiler
from dataplane.identity import Allocator, render
from dataplane.inventory import Inventory, load_inventory
from dataplane.policy import Policy, load_policy
from loader import tables
from loader.errors import DataplaneError, MapError

log = logging.getLogger("dataplane.agent")

STATE_ROOT = os.environ.get("DATAPLANE_STATE_DIR_ROOT", "/var/lib/dataplane")


class CapacityError(MapError):
    pass


class Workspace:
    """Per-instance state that must outlive the agent process."""

    def __init__(self, instance: str, state_dir: str | None = None, rules_max: int = 65536):
        self.dir = Path(state_dir) if state_dir else Path(STATE_ROOT) / instance
        self.identities = Allocator(self.dir / "identities.json")
        self.rules = Allocator(self.dir / "rules.json", first=1, limit=rules_max - 1, what="rule")
        self.applied_path = self.dir / "applied.json"

    def save_numbers(self) -> None:
        self.identities.save()
        self.rules.save()

    def read_applied(self) -> dict | None:
        try:
            return json.loads(self.applied_path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise DataplaneError(f"{self.applied_path}: corrupt ({e})") from None

    def write_applied(self, record: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.applied_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
        os.replace(tmp, self.applied_path)


def default_host() -> str:
    return socket.gethostname()


def load_sources(policy_path: str, inventory_path: str) -> tuple[Policy, Inventory]:
    return load_policy(policy_path), load_inventory(inventory_path)


def compile_for(policy: Policy, inventory: Inventory, host: str, ws: Workspace,
                now: dt.datetime | None = None) -> tuple[Compiler, CompiledState]:
    compiler = Compiler(policy, inventory, ws.identities, ws.rules, now)
    return compiler, compiler.compile(host)


def names_of(state: CompiledState, revision: int = 0):
    from dataplane.flows import Names

    return Names.build(state.host, revision, state.audit_default, state.rule_names(),
                       {n: render(lab) for n, lab in state.labels.items()}, state.entries)


def apply_compiled(dp, state: CompiledState, ws: Workspace, sources: dict | None = None) -> tables.ApplyResult:
    """Capacity check, then one atomic switch to the compiled state, then the
    record of what is in force. Numbers are saved before the maps change, so
    a crash never leaves the maps using numbers the workspace forgot."""
    identities = state.ipcache()
    try:
        layout = tables.layout_policy(state.entries)
    except MapError as e:
        raise CapacityError(f"the policy does not fit in the datapath, nothing was changed: {e}") from None
    problems = tables.check_capacity(dp, identities, state.entries, layout=layout)
    if problems:
        raise CapacityError("the policy does not fit in the datapath, nothing was changed: " + "; ".join(problems))
    ws.save_numbers()
    result = tables.apply_state(dp, identities, state.entries, audit_default=state.audit_default, layout=layout)
    ws.write_applied({
        "host": state.host,
        "applied_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "sources": sources or {},
        "generation": result.generation,
        "epoch": result.epoch,
        "mode": "audit" if state.audit_default else "enforce",
        "counts": {"prefixes": len(state.identities), "entries": len(state.entries),
                   "rules": len(state.rule_ids), "identities": len(state.labels)},
        "rules": {str(i): n for n, i in sorted(state.rule_ids.items(), key=lambda kv: kv[1])},
        "actions": names_of(state).actions_record(),
        "identities": {str(n): render(lab) for n, lab in sorted(state.labels.items())},
        "locals": state.locals,
        "warnings": state.warnings,
        "next_change": state.next_change.isoformat() if state.next_change else None,
    })
    return result


def _digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return "unreadable"


@dataclasses.dataclass
class AgentOptions:
    policy: str
    inventory: str
    interfaces: list
    netns: str | None = None
    host: str | None = None
    ingress: str = "xdp"
    state_dir: str | None = None
    poll_interval: float = 0.5
    metrics: str | None = None          # HOST:PORT of the Prometheus endpoint; None: off


class Agent:
    def __init__(self, dp, opts: AgentOptions):
        self.dp = dp
        self.opts = opts
        self.host = opts.host or default_host()
        self.ws = Workspace(dp.instance, opts.state_dir)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seen: tuple | None = None
        self._next_change: dt.datetime | None = None
        self._state_digest: str | None = None
        self.applied = 0
        self.applied_at = 0.0
        from dataplane.flows import Names

        self.names = Names.from_record(self.ws.read_applied() or {}, self.host)
        self.telemetry = None

    def start(self) -> None:
        from dataplane.telemetry import Telemetry

        outcome = self.dp.load()
        log.info("datapath %s (%s)", self.dp.instance, outcome)
        for ifname in self.opts.interfaces:
            rec = self.dp.attach(ifname, self.opts.netns, ingress=self.opts.ingress)
            log.info("attached to %s%s (%s)", ifname, f" in {self.opts.netns}" if self.opts.netns else "",
                     rec.get("xdp_mode", "tc"))
        self.telemetry = Telemetry(self.dp, self.host, lambda: self.names, self._agent_stats,
                                   metrics=self.opts.metrics).start()

    def _agent_stats(self) -> dict:
        return {"mode": "standalone", "applied_at": self.applied_at}

    def _fingerprint(self) -> tuple:
        return tuple(_digest(p) for p in (self.opts.policy, self.opts.inventory))

    def reconcile(self, force: bool = False) -> bool:
        """Applies the files if they changed (or force). Returns True when a
        new state went live; problems are logged and the old state stays."""
        fp = self._fingerprint()
        due = self._next_change is not None and dt.datetime.now(dt.timezone.utc) >= self._next_change
        if not force and not due and fp == self._seen:
            return False
        self._seen = fp
        try:
            policy, inventory = load_sources(self.opts.policy, self.opts.inventory)
            if self._fingerprint() != fp:
                # A file changed while they were read: the two may not belong together
                # (a new policy with the old inventory). Read both again at the next poll.
                self._seen = None
                log.info("policy or inventory changed while being read; reading them again")
                return False
            _, state = compile_for(policy, inventory, self.host, self.ws)
            for w in state.warnings:
                log.warning("%s", w)
            digest = hashlib.sha256(state.to_json_text().encode()).hexdigest()
            if digest == self._state_digest:
                self._next_change = state.next_change
                log.info("compiled state unchanged; nothing to apply")
                return False
            t0 = time.monotonic()
            result = apply_compiled(self.dp, state, self.ws, {"policy": self.opts.policy,
                                                               "inventory": self.opts.inventory,
                                                               "digests": list(fp)})
        except DataplaneError as e:
            log.error("not applied, the state in force stays: %s", str(e).replace("\n", "; "))
            return False
        self._next_change = state.next_change
        self._state_digest = digest
        self.applied += 1
        self.applied_at = time.time()
        self.names = names_of(state, self.applied)
        log.info("applied: %d entries, %d prefixes, generation %d, epoch %d, %.1f ms%s",
                 len(state.entries), len(state.identities), result.generation, result.epoch,
                 (time.monotonic() - t0) * 1000,
                 f"; next change at {state.next_change.isoformat()}" if state.next_change else "")
        return True

    def status(self) -> dict:
        record = self.ws.read_applied() or {}
        counts = record.get("counts", {})
        return {"host": self.host, "mode": "standalone", "entries": counts.get("entries", 0),
                "prefixes": counts.get("prefixes", 0), "applied_at": record.get("applied_at", ""),
                "connected": False}

    def run(self) -> None:
        signal.signal(signal.SIGHUP, lambda *_: self._wake.set())
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        self.reconcile(force=True)
        while not self._stop.is_set():
            woke = self._wake.wait(self.opts.poll_interval)
            if self._stop.is_set():
                break
            self._wake.clear()
            self.reconcile(force=woke)
        if self.telemetry:
            self.telemetry.stop()
        log.info("stopping; the datapath keeps enforcing the last applied state")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
