"""A real Prometheus server (Debian's `prometheus`, on loopback, started
here) scrapes the agent; what it stores matches what the agent serves and
what the traffic was."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from dataplane.lab import wait_for
from tests.conftest import require_root
from tests.netns.obs_helpers import CLIENT, SERVER, ObsAgent, frame_bytes, parse_scrape, send_udp, wait_value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, workdir, targets: list[str]):
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed: run `make setup` (Debian package prometheus)"
        self.port = _free_port()
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
            "scrape_configs": [{"job_name": "dataplane", "static_configs": [{"targets": targets}]}]}))
        self.log = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"), start_new_session=True)

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _series(result: list[dict], *labels: str) -> dict:
    return {tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1]) for r in result}


def test_prometheus_scrapes_the_agent_and_the_series_match(tmp_path):
    require_root()
    agent = ObsAgent(tmp_path, "prom")
    prom = None
    try:
        agent.wait_ready()
        agent.sink(agent.server_ns, [5500])
        prom = Prometheus(tmp_path, [f"127.0.0.1:{agent.port}"])
        assert wait_for(prom.ready, timeout=60, interval=0.5), prom.log.read_text()[-3000:]
        assert wait_for(lambda: prom.query('up{job="dataplane"} == 1'), timeout=30, interval=0.5), \
            prom.log.read_text()[-3000:]

        send_udp(agent.lab, agent.client_ns, CLIENT, SERVER, 5500, 11, 50)
        send_udp(agent.lab, agent.client_ns, CLIENT, SERVER, 6000, 4, 50)
        wait_value(agent, "dataplane_rule_packets_total", 11, rule="prom-5500", action="allow", direction="ingress")
        wait_value(agent, "dataplane_rule_packets_total", 4, rule="deny-6000", action="deny", direction="ingress")

        # Prometheus holds exactly the traffic sent...
        q = 'dataplane_rule_packets_total{rule="prom-5500",direction="ingress"}'
        assert wait_for(lambda: _series(prom.query(q), "rule") == {("prom-5500",): 11.0}, timeout=30, interval=0.5), \
            prom.query(q)
        r = prom.query('dataplane_rule_bytes_total{rule="prom-5500",direction="ingress"}')
        assert _series(r, "action") == {("allow",): 11.0 * frame_bytes(50)}, r
        r = prom.query('dataplane_rule_packets_total{rule="deny-6000",direction="ingress"}')
        assert _series(r, "action") == {("deny",): 4.0}, r

        # ... and every series of these families equals the agent's own scrape
        # (the traffic has stopped, so the values are stable).
        time.sleep(2.5)
        direct = parse_scrape(agent.scrape_text())
        for family, labels in (("dataplane_rule_packets_total", ("rule", "action", "direction")),
                               ("dataplane_rule_bytes_total", ("rule", "action", "direction")),
                               ("dataplane_dropped_packets_total", ("reason",)),
                               ("dataplane_map_capacity", ("map",)),
                               ("dataplane_policy_rules", ())):
            want = {tuple(dict(lab)[k] for k in labels): v for (name, lab), v in direct.items() if name == family}
            assert want, family
            got = _series(prom.query(family), *labels)
            assert got == want, (family, got, want)
        info = prom.query("dataplane_agent_info")
        assert info and info[0]["metric"]["host"] == "obs-host", info
    finally:
        if prom:
            prom.stop()
        agent.close()
    assert "Traceback" not in agent.text()
