"""The standalone agent: applies on start, re-applies when a file changes or
on SIGHUP, keeps the state in force when a new file is bad, and re-applies by
itself when a rule's validity window closes."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from dataplane.lab import Lab, wait_for
from loader import tables
from loader.instance import Datapath
from tests.conftest import require_root
from tests.netns.helpers import instance_name, unload_if_present

ROOT = Path(__file__).resolve().parents[2]

INVENTORY = """
apiVersion: zt-dataplane/v1
kind: Inventory
hosts: [{name: h1, address: 10.205.0.1}]
endpoints:
  - {name: app-1, host: h1, address: 10.205.0.10, labels: {app: app}}
  - {name: cli-1, host: h1, address: 10.205.0.20, labels: {app: cli}}
"""

POLICY = """
apiVersion: zt-dataplane/v1
kind: Policy
rules:
  - name: cli-to-app
    action: allow
    from: [{{workload: {{app: cli}}}}]
    to: [{{workload: {{app: app}}}}]
    ports: [tcp/{port}]
{extra}
"""


def policy_text(port: int, extra: str = "") -> str:
    return POLICY.format(port=port, extra=extra)


class AgentProcess:
    def __init__(self, tmp: Path, instance: str, ifname: str, ns: str):
        self.log = tmp / "agent.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dataplane", "--instance", instance, "agent", "--policy", str(tmp / "p.yaml"),
             "--inventory", str(tmp / "i.yaml"), "--interface", ifname, "--netns", ns, "--host", "h1",
             "--state-dir", str(tmp / "state")],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log.open("w"), start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def count(self, needle: str) -> int:
        return self.text().count(needle)

    def wait_count(self, needle: str, n: int, timeout: float = 60) -> bool:
        return wait_for(lambda: self.count(needle) >= n or self.proc.poll() is not None, timeout=timeout) \
            and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def live_state(dp) -> tuple:
    gen = tables.active_generation(dp)
    policy, _ = tables.read_policy(dp, gen)
    return gen, dp.read_config().epoch, sorted(policy.items())


def test_agent_applies_reapplies_and_keeps_state_on_bad_input(tmp_path):
    require_root()
    instance = instance_name("agent")
    (tmp_path / "i.yaml").write_text(INVENTORY)
    (tmp_path / "p.yaml").write_text(policy_text(80))
    with Lab() as lab:
        a, b = lab.ns("a"), lab.ns("b")
        _, ifname = lab.link(a, b, ["10.205.0.100/24"], ["10.205.0.1/24"])
        agent = AgentProcess(tmp_path, instance, ifname, b)
        try:
            assert agent.wait_count("INFO: applied:", 1, timeout=180), agent.text()
            dp = Datapath(instance).adopt()
            first = live_state(dp)
            record = json.loads((tmp_path / "state" / "applied.json").read_text())
            assert record["rules"] == {"1": "cli-to-app"}
            ports = {k[2] for k, _ in first[2]}
            assert 80 in ports

            # A broken file: reported, the state in force stays.
            (tmp_path / "p.yaml").write_text(policy_text(80) + "  - name: oops\n    action: maybe\n")
            assert agent.wait_count("ERROR: not applied", 1, timeout=10), agent.text()
            assert "p.yaml:" in agent.text().split("ERROR: not applied", 1)[1].splitlines()[0]
            assert live_state(dp) == first

            # A good change is applied: a new generation, a new epoch, the new port.
            (tmp_path / "p.yaml").write_text(policy_text(8080))
            assert agent.wait_count("INFO: applied:", 2, timeout=10), agent.text()
            second = live_state(dp)
            assert second[0] != first[0] and second[1] == first[1] + 1
            assert {k[2] for k, _ in second[2]} == {8080}

            # SIGHUP with nothing changed: nothing to apply, nothing switched.
            os.killpg(agent.proc.pid, signal.SIGHUP)
            assert agent.wait_count("compiled state unchanged", 1, timeout=10), agent.text()
            assert live_state(dp) == second

            # A rule whose window closes in a few seconds: the agent re-applies by itself.
            until = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
            extra = (f"  - name: short-lived\n    action: allow\n    from: [{{workload: {{app: cli}}}}]\n"
                     f"    to: [{{workload: {{app: app}}}}]\n    ports: [udp/53]\n    valid: {{notAfter: {until}}}\n")
            (tmp_path / "p.yaml").write_text(policy_text(8080, extra))
            assert agent.wait_count("INFO: applied:", 3, timeout=10), agent.text()
            assert any(k[3] == 17 for k, _ in live_state(dp)[2])
            assert agent.wait_count("INFO: applied:", 4, timeout=15), agent.text()
            assert not any(k[3] == 17 for k, _ in live_state(dp)[2])
            dp.close()
        finally:
            agent.stop()
            unload_if_present(instance)
    assert "Traceback" not in agent.text()
