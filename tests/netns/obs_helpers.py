"""Shared pieces of the observability tests: a standalone agent with its
Prometheus endpoint, enforcing for a server namespace, and helpers to send
exact numbers of datagrams and read the scrape."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from dataplane.lab import Lab, wait_for
from tests.netns.helpers import CLI, instance_name, start_server, unload_if_present

ROOT = Path(__file__).resolve().parents[2]

CLIENT, SERVER = "10.207.0.20", "10.207.0.10"
CLIENT_PORT = 40000          # fixed source port: every datagram of a test is one flow

INVENTORY = f"""
apiVersion: zt-dataplane/v1
kind: Inventory
hosts: [{{name: obs-host, address: 10.207.0.1}}]
endpoints:
  - {{name: app-1, host: obs-host, address: {SERVER}, labels: {{app: app, tier: web}}}}
networks:
  - {{name: clients, cidrs: [{CLIENT}/32], labels: {{app: cli, zone: branch}}}}
"""

POLICY = """
apiVersion: zt-dataplane/v1
kind: Policy
rules:
  - {name: udp-5000, action: allow, from: [{network: {app: cli}}], to: [{workload: {app: app}}], ports: [udp/5000]}
  - {name: deny-6000, action: deny, from: [{network: {app: cli}}], to: [{workload: {app: app}}], ports: [udp/6000]}
  - {name: audit-7000, action: audit, from: [{network: {app: cli}}], to: [{workload: {app: app}}], ports: [udp/7000]}
  - {name: app-to-cli-9000, action: allow, from: [{workload: {app: app}}], to: [{network: {app: cli}}],
     ports: [udp/9000]}
  - {name: prom-5500, action: allow, from: [{network: {app: cli}}], to: [{workload: {app: app}}], ports: [udp/5500]}
  - {name: deny-61xx, action: deny, from: [{network: {app: cli}}], to: [{workload: {app: app}}],
     ports: [udp/6100-6199]}
  - {name: allow-tcp-80, action: allow, from: [{network: {app: cli}}], to: [{workload: {app: app}}], ports: [tcp/80]}
"""

# Sends COUNT datagrams of SIZE bytes from (SRC, SPORT) to (DST, DPORT).
_SENDER = """
import socket, sys
src, sport, dst, dport, count, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), \\
    int(sys.argv[5]), int(sys.argv[6])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((src, sport))
payload = b"x" * size
for _ in range(count):
    s.sendto(payload, (dst, dport))
print("sent", count)
"""


def send_udp(lab: Lab, ns: str, src: str, dst: str, dport: int, count: int, size: int = 100,
             sport: int = CLIENT_PORT) -> None:
    out = lab.run(ns, [sys.executable, "-c", _SENDER, src, str(sport), dst, str(dport), str(count), str(size)],
                  timeout=120)
    assert out.returncode == 0 and f"sent {count}" in out.stdout, out.stderr


def frame_bytes(payload: int) -> int:
    """What the datapath counts for one of our IPv4 UDP datagrams: the frame."""
    return 14 + 20 + 8 + payload


class ObsAgent:
    """`dataplane agent` (standalone) with --metrics on loopback, for a server namespace."""

    def __init__(self, tmp: Path, tag: str):
        self.tmp = tmp
        self.instance = instance_name(tag)
        self.lab = Lab()
        self.client_ns, self.server_ns = self.lab.ns("c"), self.lab.ns("s")
        _, self.server_if = self.lab.link(self.client_ns, self.server_ns, [f"{CLIENT}/24"], [f"{SERVER}/24"])
        (tmp / "policy.yaml").write_text(POLICY)
        (tmp / "inventory.yaml").write_text(INVENTORY)
        self.log = tmp / "agent.log"
        self.proc = subprocess.Popen(
            [str(CLI), "--instance", self.instance, "agent", "--policy", str(tmp / "policy.yaml"),
             "--inventory", str(tmp / "inventory.yaml"), "--interface", self.server_if, "--netns", self.server_ns,
             "--host", "obs-host", "--state-dir", str(tmp / "state"), "--metrics", "127.0.0.1:0"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log.open("w"), start_new_session=True)
        self.port = 0
        self.servers = []

    def text(self) -> str:
        return self.log.read_text()

    def wait_ready(self, timeout: float = 180) -> None:
        def ready():
            m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", self.text())
            if m:
                self.port = int(m.group(1))
            return (self.port and "INFO: applied:" in self.text()) or self.proc.poll() is not None
        assert wait_for(ready, timeout=timeout) and self.proc.poll() is None, f"agent did not start: {self.text()}"

    def sink(self, ns: str, ports: list[int]):
        server = start_server(self.lab, ns, [f"udp:{p}:sink" for p in ports] +
                              [f"tcp:{p}:echo" for p in ports if p == 80])
        self.servers.append(server)
        return server

    def scrape_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            return r.read().decode()

    def scrape(self) -> dict:
        """{(sample name, frozenset(labels)): value}"""
        return parse_scrape(self.scrape_text())

    def observe_cmd(self) -> list[str]:
        return [str(CLI), "--instance", self.instance, "observe"]

    def observe(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([*self.observe_cmd(), *args], capture_output=True, text=True, timeout=timeout)

    def flows(self, *args: str) -> list[dict]:
        out = self.observe("-o", "json", "--last", "0", *args)
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def signal(self, sig) -> None:
        os.kill(self.proc.pid, sig)

    def close(self) -> None:
        try:
            for s in self.servers:
                s.stop()
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
        finally:
            unload_if_present(self.instance)
            self.lab.close()


def parse_scrape(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not in the scrape; have " + \
        ", ".join(sorted(f"{n}{dict(l)}" for n, l in samples if n == name))
    return samples[key]


def wait_value(agent: ObsAgent, name: str, want: float, timeout: float = 20, **labels) -> float:
    """The counter reaches want (the datapath counts as packets arrive; the
    sender may return before the last one was judged)."""
    got = None

    def reached():
        nonlocal got
        got = value(agent.scrape(), name, **labels)
        return got >= want
    wait_for(reached, timeout=timeout, interval=0.2)
    return got
