"""Shared pieces of the netns tier: the two-namespace topology, traffic
endpoints (peer.py) run inside the namespaces, the `dataplane` CLI, table
setup, counter deltas and checks that an interface or instance left
nothing behind."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dataplane.lab import Lab
from loader import abi, tables
from loader.instance import PIN_ROOT, STATE_ROOT, Datapath

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PEER = HERE / "peer.py"
AGENT = HERE / "agent.py"
CLI = ROOT / ".venv" / "bin" / "dataplane"
if not CLI.exists():  # installed elsewhere: take the one on PATH
    CLI = Path(shutil.which("dataplane") or CLI)

SERVER_ID = 300
CLIENT_ID = 400
OTHER_ID = 401   # an identity no policy entry mentions

TCP, UDP = 6, 17
INGRESS, EGRESS = abi.Direction.INGRESS, abi.Direction.EGRESS
ALLOW, DENY = abi.Verdict.ALLOW, abi.Verdict.DENY

# Generous bounds: nothing here is a performance claim.
START_TIMEOUT = 30.0      # a helper process to come up
DENIED_WAIT = 3.0         # how long a denied connect/request is given (local RTT is microseconds)


def instance_name(tag: str) -> str:
    return f"dpnt_{tag}_{os.getpid()}"


def entry(local_id, remote_id, direction, proto, port, action, rule_id, port_hi=None) -> tables.PolicyEntry:
    return tables.PolicyEntry(local_id, remote_id, direction, proto, port, port if port_hi is None else port_hi,
                              action, rule_id)


# --- topology -------------------------------------------------------------------

@dataclasses.dataclass
class Topology:
    """A client and a server namespace joined by one veth pair."""

    lab: Lab
    client_ns: str
    server_ns: str
    client_if: str
    server_if: str
    client_v4: str = "10.201.0.1"
    server_v4: str = "10.201.0.2"
    client_v6: str = "fd00:201::1"
    server_v6: str = "fd00:201::2"

    def client(self, family: str) -> str:
        return self.client_v4 if family == "ipv4" else self.client_v6

    def server(self, family: str) -> str:
        return self.server_v4 if family == "ipv4" else self.server_v6

    def identities(self, client_id: int | None = CLIENT_ID) -> dict:
        """Host prefixes of both sides; client_id None leaves the client out."""
        ids = {ipaddress.ip_network(self.server_v4): SERVER_ID, ipaddress.ip_network(self.server_v6): SERVER_ID}
        if client_id is not None:
            ids[ipaddress.ip_network(self.client_v4)] = client_id
            ids[ipaddress.ip_network(self.client_v6)] = client_id
        return ids


def make_topology(lab: Lab) -> Topology:
    client_ns, server_ns = lab.ns("c"), lab.ns("s")
    t = Topology(lab, client_ns, server_ns, "", "")
    t.client_if, t.server_if = lab.link(client_ns, server_ns, [f"{t.client_v4}/24", f"{t.client_v6}/64"],
                                        [f"{t.server_v4}/24", f"{t.server_v6}/64"])
    return t


# --- processes in namespaces -------------------------------------------------------

def kill_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGKILL to a process started with start_new_session, and its children; waits for it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


class Follower:
    """Collects a process's stdout lines as they come (a thread per stream)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._lines: list[str] = []
        self._err: list[str] = []
        self._cond = threading.Condition()
        self.closed = False
        threading.Thread(target=self._read, args=(proc.stdout, self._lines, True), daemon=True).start()
        if proc.stderr is not None:
            threading.Thread(target=self._read, args=(proc.stderr, self._err, False), daemon=True).start()

    def _read(self, stream, sink, is_stdout):
        try:
            for raw in stream:
                line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
                with self._cond:
                    sink.append(line.rstrip("\n"))
                    self._cond.notify_all()
        except (ValueError, OSError):
            pass  # stream closed under us at teardown
        if is_stdout:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def lines(self, start: int = 0) -> list[str]:
        with self._cond:
            return self._lines[start:]

    def mark(self) -> int:
        with self._cond:
            return len(self._lines)

    def stderr(self) -> str:
        with self._cond:
            return "\n".join(self._err)

    def wait_line(self, predicate, timeout: float, start: int = 0) -> str | None:
        """First line from `start` on satisfying predicate, waiting up to timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self._lines):
                    if predicate(self._lines[i]):
                        return self._lines[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    return None
                self._cond.wait(left)

    def stop(self) -> None:
        kill_group(self.proc)

    def describe(self) -> str:
        return f"exit {self.proc.poll()}; stdout tail {self.lines()[-5:]}; stderr {self.stderr()[-2000:]!r}"


def peer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-u", str(PEER), *map(str, args)]


def start_peer(lab: Lab, ns: str, *args: str) -> Follower:
    return Follower(lab.popen(ns, peer_cmd(*args)))


def start_server(lab: Lab, ns: str, listens: list[str]) -> Follower:
    """peer.py serve with --listen tcp|udp:PORT:echo|sink for each item."""
    args = ["serve"]
    for spec in listens:
        args += ["--listen", spec]
    server = start_peer(lab, ns, *args)
    assert server.wait_line(lambda l: l == "listening", START_TIMEOUT), f"server did not start: {server.describe()}"
    return server


def request(lab: Lab, ns: str, kind: str, addr: str, port: int, payload: str = "ping",
            timeout: float = 10.0) -> dict:
    """One tcp-request or udp-request from namespace ns; the peer's JSON result."""
    out = lab.run(ns, peer_cmd(kind, addr, port, "--payload", payload, "--timeout", timeout),
                  timeout=timeout + 60)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    assert lines, f"{kind} {addr} {port}: no result (exit {out.returncode}): {out.stderr[-2000:]}"
    return json.loads(lines[-1])


def requests_at_once(lab: Lab, ns: str, specs: list[tuple]) -> list[dict]:
    """Several request() calls in parallel; specs are (kind, addr, port[, payload[, timeout]])."""
    with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
        futures = [pool.submit(request, lab, ns, *spec) for spec in specs]
        return [f.result() for f in futures]


def server_events(server: Follower, kind: str, proto: str, port: int, start: int = 0) -> list[list[str]]:
    """Parsed `accept`/`recv` lines of one listening port."""
    out = []
    for line in server.lines(start):
        f = line.split()
        if len(f) >= 4 and f[0] == kind and f[1] == proto and f[2] == str(port):
            out.append(f)
    return out


# --- the datapath -------------------------------------------------------------------

def configure(dp: Datapath, identities: dict, policy: list[tables.PolicyEntry]) -> None:
    """Sets the ipcache and policy to exactly these and forgets tracked flows."""
    tables.sync_identities(dp, identities)
    tables.sync_policy(dp, policy)
    dp.ct.clear()
    dp.frag.clear()


def reasons(dp: Datapath) -> collections.Counter:
    return collections.Counter({r: pk for r, (pk, _) in dp.reason_counters().items()})


def delta(before: collections.Counter, after: collections.Counter) -> collections.Counter:
    return collections.Counter({k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)})


def cli(*args, instance: str | None = None, prefix: tuple | list = (), timeout: float = 300,
        env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [*prefix, str(CLI)] + (["--instance", instance] if instance else []) + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def cli_json(*args, instance: str):
    out = cli(*args, "-o", "json", instance=instance)
    assert out.returncode == 0, f"dataplane {' '.join(map(str, args))}: exit {out.returncode}: {out.stderr}"
    return json.loads(out.stdout)


def ct_rows_for(rows: list[dict], a: str, b: str) -> list[dict]:
    """Conntrack rows (`bpf map dump ct -o json`) whose endpoints are a and b."""
    return [r for r in rows if {r["initiator"], r["responder"]} == {a, b}]


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def unload_if_present(instance: str) -> None:
    dp = Datapath(instance)
    if os.path.isdir(dp.pin_dir) or os.path.exists(dp.state_path):
        dp.unload()


def leftovers(instance: str) -> list[str]:
    """Pin and state directories of an instance that still exist."""
    paths = [os.path.join(PIN_ROOT, instance), os.path.join(STATE_ROOT, instance)]
    return [p for p in paths if os.path.exists(p)]


# --- interfaces ------------------------------------------------------------------------

_XDP_IN_LINK = re.compile(r"\bxdp(generic|drv|offload|multi)?\b|prog/xdp")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def hooks_on(ns: str, ifname: str) -> dict:
    """What the kernel has on the interface, as iproute2 shows it."""
    link = _run(["ip", "-n", ns, "-d", "link", "show", "dev", ifname])
    assert link.returncode == 0, link.stderr
    state = {"xdp": bool(_XDP_IN_LINK.search(link.stdout)), "link": link.stdout}
    for direction in ("ingress", "egress"):
        out = _run(["tc", "-n", ns, "filter", "show", "dev", ifname, direction])
        state[direction] = out.stdout.strip()
    state["clsact"] = "clsact" in _run(["tc", "-n", ns, "qdisc", "show", "dev", ifname]).stdout
    return state


def assert_nothing_attached(ns: str, ifname: str) -> None:
    h = hooks_on(ns, ifname)
    assert not h["xdp"], f"{ifname}: an XDP program is attached:\n{h['link']}"
    assert not h["ingress"], f"{ifname}: tc ingress filters left:\n{h['ingress']}"
    assert not h["egress"], f"{ifname}: tc egress filters left:\n{h['egress']}"
    assert not h["clsact"], f"{ifname}: clsact qdisc left behind"
