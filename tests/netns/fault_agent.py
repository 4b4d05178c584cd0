"""Pieces of the fault-injection tests: `dataplane agent` processes started as
the CLI starts them and killed with SIGKILL, their source files switched
atomically, a quiet two-namespace topology, and a watcher that timestamps
what an apply does to the maps while it runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from dataplane.lab import Lab, wait_for
from loader import tables
from tests.netns.helpers import CLI, ROOT, kill_group

APPLIED = "INFO: applied:"
AGENT_START_TIMEOUT = 300.0      # the first start compiles the programs


# --- topology ---------------------------------------------------------------------------

def _ip(*args: str) -> str:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"ip {' '.join(args)}: {out.stderr}"
    return out.stdout


def quiet_topology(lab: Lab, clients: list[str], server: str) -> dict:
    """Client and server namespaces joined by one veth pair, IPv4 only, with
    permanent neighbour entries both ways: the only packets on the link are
    the test's own, so the kernel's counters can be matched exactly."""
    client_ns, server_ns = lab.ns("c"), lab.ns("s")
    client_if, server_if = lab.link(client_ns, server_ns, [f"{a}/24" for a in clients], [f"{server}/24"])
    for ns, ifname in ((client_ns, client_if), (server_ns, server_if)):
        lab.run(ns, ["sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1"], check=True)
    macs = {ns: json.loads(_ip("-n", ns, "-j", "link", "show", "dev", ifname))[0]["address"]
            for ns, ifname in ((client_ns, client_if), (server_ns, server_if))}
    _ip("-n", client_ns, "neigh", "replace", server, "lladdr", macs[server_ns], "dev", client_if, "nud", "permanent")
    for addr in clients:
        _ip("-n", server_ns, "neigh", "replace", addr, "lladdr", macs[client_ns], "dev", server_if, "nud", "permanent")
    return {"client_ns": client_ns, "server_ns": server_ns, "client_if": client_if, "server_if": server_if}


def link_drops(ns: str, ifname: str) -> dict:
    """The interface's own drop counters (a full veth ring drops before any program runs)."""
    stats = json.loads(_ip("-n", ns, "-s", "-j", "link", "show", "dev", ifname))[0]["stats64"]
    return {"rx_dropped": stats["rx"]["dropped"], "tx_dropped": stats["tx"]["dropped"]}


# --- source files ---------------------------------------------------------------------------

class Sources:
    """The agent's --policy and --inventory paths; `switch` replaces both
    files by renames a few microseconds apart, so the agent's file poll
    cannot plausibly read one new file and one old."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policy = self.dir / "policy.yaml"
        self.inventory = self.dir / "inventory.yaml"

    def switch(self, policy_text: str, inventory_text: str) -> None:
        staged = []
        for path, text in ((self.policy, policy_text), (self.inventory, inventory_text)):
            tmp = path.with_name(f".{path.name}.new")
            tmp.write_text(text)
            staged.append((tmp, path))
        for tmp, path in staged:
            os.replace(tmp, path)


# --- the agent --------------------------------------------------------------------------------

class AgentProcess:
    """One `dataplane agent` process (standalone mode) logging to a file of its own."""

    def __init__(self, instance: str, sources: Sources, ifname: str, netns: str, host: str, state_dir: Path,
                 log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [str(CLI), "--instance", instance, "agent", "--policy", str(sources.policy), "--inventory",
             str(sources.inventory), "--interface", ifname, "--netns", netns, "--host", host,
             "--state-dir", str(state_dir)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def applied(self) -> int:
        return self.text().count(APPLIED)

    def wait_applied(self, n: int, timeout: float = 120) -> None:
        ok = wait_for(lambda: self.applied() >= n or self.proc.poll() is not None, timeout=timeout, interval=0.01)
        assert ok and self.proc.poll() is None and self.applied() >= n, \
            f"agent did not apply ({n}): exit {self.proc.poll()}; log:\n{self.text()[-3000:]}"

    def hup(self) -> None:
        os.kill(self.proc.pid, signal.SIGHUP)

    def kill(self) -> int:
        """SIGKILL, as a crash: nothing of the agent runs after it. Returns the exit status."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        kill_group(self.proc, timeout=30)


# --- watching an apply ---------------------------------------------------------------------------

class ApplyWatcher:
    """Polls, on a thread, what an apply does that can be seen cheaply from
    outside: a marker key of the new state appearing in the idle
    generation's ipcache (the writes have begun), one appearing in its
    policy map (written last, in one batch) and the live generation
    changing (the flip); and the agent logging that it applied. Times are
    CLOCK_MONOTONIC seconds."""

    def __init__(self, dp, markers: tuple, live_before: int, agent: AgentProcess | None = None,
                 applied_before: int = 0):
        self.dp, self.live_before = dp, live_before
        self.marker, self.policy_marker = markers
        self.agent, self.applied_before = agent, applied_before
        self.t0 = time.monotonic()
        self.written: float | None = None
        self.policy_written: float | None = None
        self.flipped: float | None = None
        self.done: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._poll()
        except Exception:   # the maps were closed under us: the test is tearing down
            pass

    def _poll(self) -> None:
        polls = 0
        while not self._stop.is_set():
            now = time.monotonic()
            if self.written is None and self.dp.ipcache.lookup(self.marker) is not None:
                self.written = now
            if self.policy_written is None and self.dp.policy.lookup(self.policy_marker) is not None:
                self.policy_written = now
            if self.flipped is None and tables.active_generation(self.dp) != self.live_before:
                self.flipped = now
                self.written = self.written or now
                self.policy_written = self.policy_written or now
            polls += 1
            if self.agent is not None and self.done is None and polls % 10 == 0 \
                    and self.agent.applied() > self.applied_before:
                self.done = time.monotonic()
            time.sleep(0.001)

    def wait(self, what: str, timeout: float = 60) -> float | None:
        wait_for(lambda: getattr(self, what) is not None, timeout=timeout, interval=0.001)
        return getattr(self, what)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --- everything a fault test sets up, torn down even on failure ---------------------------------

class FaultRig:
    """A lab, one datapath instance, the agent processes started for it and
    helper processes; close() kills them all, unloads the instance and
    removes the namespaces."""

    def __init__(self, tmp: Path, tag: str):
        from tests.netns.helpers import instance_name

        self.tmp = tmp
        self.instance = instance_name(tag)
        self.lab = Lab()
        self.state_dir = tmp / "state"
        self.agents: list[AgentProcess] = []
        self.followers: list = []
        self.watchers: list[ApplyWatcher] = []
        self._dp = None

    def start_agent(self, sources: Sources, topo: dict, host: str) -> AgentProcess:
        agent = AgentProcess(self.instance, sources, topo["server_if"], topo["server_ns"], host, self.state_dir,
                             self.tmp / f"agent-{len(self.agents)}.log")
        self.agents.append(agent)
        return agent

    def datapath(self):
        """The instance opened from its pins, as any other process would."""
        from loader.instance import Datapath

        if self._dp is None:
            self._dp = Datapath(self.instance).adopt()
        return self._dp

    def close(self) -> list[str]:
        """Tears everything down; returns what the instance left behind."""
        from tests.netns.helpers import leftovers, unload_if_present

        try:
            for w in self.watchers:
                w.stop()
            for a in self.agents:
                a.stop()
            for f in self.followers:
                f.stop()
            if self._dp is not None:
                self._dp.close()
            # A killed agent leaves its status socket behind: unload removes it (stale) with the rest.
            unload_if_present(self.instance)
        finally:
            self.lab.close()
        return leftovers(self.instance)
