"""Shared pieces of the fleet tier: controller, agent and etcd processes
with their logs, admin commands through the `dataplane` CLI, direct gRPC
calls with chosen certificates, traffic probes inside lab namespaces,
datapath snapshots, and checks that nothing was left behind.

Every process started here is registered and every name carries this
process id, so teardown can stop exactly what this run started and then
check that none of it remains (processes, pins, /run/dataplane, network
namespaces, temporary directories)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from dataplane.lab import Lab, wait_for
from dataplane.v1 import controller_pb2 as pb
from dataplane.v1 import controller_pb2_grpc as pb_grpc
from loader import tables
from loader.instance import PIN_ROOT, STATE_ROOT, Datapath

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / ".venv" / "bin" / "dataplane"
if not CLI.exists():  # installed elsewhere: take the one on PATH
    CLI = Path(shutil.which("dataplane") or CLI)
ETCD = "/usr/bin/etcd"

# Generous bounds: nothing here is a performance claim.
START_TIMEOUT = 240.0     # an agent compiling its datapath (several at once on two CPUs)
SYNC_TIMEOUT = 60.0       # agents to (re)connect and apply, reconnect backoff included
DENIED_WAIT = 2.0         # a denied connect is given this long (local RTT is microseconds)
ALLOWED_WAIT = 10.0

# The three-host fleet: A is alice's device (its address is her session's),
# B runs the application (registered by B's agent), C the database (declared
# in the inventory). B and C also have host addresses their agents register.
ALICE_ADDR = "10.231.0.11"
APP_ADDR, B_HOST_ADDR = "10.231.0.21", "10.231.0.2"
DB_ADDR, C_HOST_ADDR = "10.231.0.31", "10.231.0.3"
APP_PORT, DB_PORT = 8080, 5432
APP_SERVICE_PORTS = [APP_PORT, 9090]
DB_SERVICE_PORTS = [DB_PORT, 5433, 5434, 5435]
ALICE_SESSION = f"alice@{ALICE_ADDR}"

FLEET_INVENTORY = f"""\
apiVersion: zt-dataplane/v1
kind: Inventory
hosts:
  - {{name: A, labels: {{role: device}}}}
  - {{name: B, labels: {{role: app}}}}
  - {{name: C, labels: {{role: db}}}}
endpoints:
  - {{name: db-1, host: C, address: {DB_ADDR}, labels: {{app: db, tier: data}}}}
"""
B_ENDPOINTS = f"- {{name: app-1, addresses: [{APP_ADDR}], labels: {{app: app, tier: front}}}}\n"


def fleet_policy(db_ports=(DB_PORT,), app_ports=()) -> str:
    """Staff reach the app on APP_PORT; the app reaches the database on
    db_ports (and itself on app_ports); nothing else."""
    text = f"""\
apiVersion: zt-dataplane/v1
kind: Policy
metadata: {{name: fleet}}
rules:
  - name: staff-to-app
    action: allow
    from: [{{user: {{group: staff}}}}]
    to: [{{workload: {{app: app}}}}]
    ports: [tcp/{APP_PORT}]
    conditions: {{posture: {{managed: true}}}}
  - name: app-to-db
    action: allow
    from: [{{workload: {{app: app}}}}]
    to: [{{workload: {{app: db}}}}]
    ports: [{", ".join(f"tcp/{p}" for p in db_ports)}]
"""
    if app_ports:
        text += f"""\
  - name: app-to-app
    action: allow
    from: [{{workload: {{app: app}}}}]
    to: [{{workload: {{app: app}}}}]
    ports: [{", ".join(f"tcp/{p}" for p in app_ports)}]
"""
    return text


_PID = os.getpid()
_labs = iter(range(1000))


def tag(name: str) -> str:
    """A name unique to this test run."""
    return f"{name}{_PID}"


def instance_name(tag_: str) -> str:
    return f"dpfl_{tag_}_{_PID}"


def new_lab(registry: Registry) -> Lab:
    # Interface names are <prefix>p<N>: keep the prefix short (15 characters in all).
    lab = Lab(f"fl{_PID % 100000}{next(_labs)}")
    registry.lab_prefixes.add(lab.prefix)
    return lab


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- bookkeeping ----------------------------------------------------------------------

class Registry:
    """What this run started: processes, instances, temporary directories,
    namespaces. Teardown checks them all."""

    def __init__(self):
        self.procs: list["LoggedProcess"] = []
        self.instances: set[str] = set()
        self.tmpdirs: set[str] = set()
        self.lab_prefixes: set[str] = set()

    def tmpdir(self, what: str) -> Path:
        d = tempfile.mkdtemp(prefix=f"dpfleet-{what}-{_PID}-")
        self.tmpdirs.add(d)
        return Path(d)

    def leftovers(self) -> list[str]:
        found = []
        for p in self.procs:
            if p.proc.poll() is None:
                found.append(f"process {p.proc.pid} still running: {p.argv}")
        for inst in sorted(self.instances):
            for path in (os.path.join(PIN_ROOT, inst), os.path.join(STATE_ROOT, inst)):
                if os.path.exists(path):
                    found.append(f"{path} exists")
        for d in sorted(self.tmpdirs):
            if os.path.exists(d):
                found.append(f"temporary directory {d} exists")
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for line in netns.splitlines():
            name = line.split()[0] if line.split() else ""
            if any(name.startswith(prefix + "-") for prefix in self.lab_prefixes):
                found.append(f"network namespace {name} exists")
        markers = list(self.instances) + [d for d in self.tmpdirs] + [p + "-" for p in self.lab_prefixes]
        for pid, cmdline in _process_table():
            if pid == _PID:
                continue
            if any(m in cmdline for m in markers):
                found.append(f"process {pid} still running: {cmdline[:200]}")
        return found


def _process_table():
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            yield int(entry), raw.replace(b"\0", b" ").decode(errors="replace")


# --- processes with logs ----------------------------------------------------------------

class LoggedProcess:
    """A process whose output (stdout and stderr together) is collected line
    by line with the monotonic time each line arrived, and copied to a file."""

    def __init__(self, argv: list[str], log_path: Path, registry: Registry, **kw):
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self._lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self.closed = False
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT, **kw)
        registry.procs.append(self)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        with open(self.log_path, "a") as log:
            try:
                for raw in self.proc.stdout:
                    line = raw.decode(errors="replace").rstrip("\n")
                    log.write(line + "\n")
                    log.flush()
                    with self._cond:
                        self._lines.append((time.monotonic(), line))
                        self._cond.notify_all()
            except (ValueError, OSError):
                pass
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self._lines)

    def lines(self, start: int = 0) -> list[str]:
        with self._cond:
            return [l for _, l in self._lines[start:]]

    def timed_lines(self, start: int = 0) -> list[tuple[float, str]]:
        with self._cond:
            return list(self._lines[start:])

    def text(self) -> str:
        return "\n".join(self.lines())

    def count(self, needle: str, start: int = 0) -> int:
        return sum(needle in l for l in self.lines(start))

    def wait_line(self, predicate, timeout: float, start: int = 0) -> str | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self._lines):
                    if predicate(self._lines[i][1]):
                        return self._lines[i][1]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    return None
                self._cond.wait(min(left, 0.5))

    def wait_count(self, needle: str, n: int, timeout: float, start: int = 0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if sum(needle in l for _, l in self._lines[start:]) >= n:
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    return False
                self._cond.wait(min(left, 0.5))

    def running(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Sends sig to the process group, waits, and kills it if it lingers."""
        try:
            self.send(sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode

    def describe(self) -> str:
        return f"exit {self.proc.poll()}; last output:\n" + "\n".join(self.lines()[-25:])


# --- the CLI --------------------------------------------------------------------------------

def dataplane(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def one_line_error(out: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command, checked to be an operator error."""
    assert out.returncode != 0, f"expected a failure; stdout: {out.stdout!r} stderr: {out.stderr!r}"
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr:\n{out.stderr}"
    assert lines[0].startswith("dataplane: error: "), lines[0]
    return lines[0]


def make_pki(directory: Path, agents: list[str], admins: list[str] = ("ops",)) -> Path:
    out = dataplane("certs", "init", "--dir", directory, "--agent", ",".join(agents), "--admin", ",".join(admins))
    assert out.returncode == 0, out.stderr
    return directory


@dataclasses.dataclass
class Admin:
    """Admin commands against one controller, with one admin certificate."""

    address: str
    tls_dir: Path
    name: str = "ops"

    def run(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        return dataplane(*args, "--controller", self.address, "--tls-dir", self.tls_dir, "--as", self.name,
                         timeout=timeout)

    def ok(self, *args) -> str:
        out = self.run(*args)
        assert out.returncode == 0, f"dataplane {' '.join(map(str, args))}: exit {out.returncode}: {out.stderr}"
        return out.stdout

    def json(self, *args):
        return json.loads(self.ok(*args, "-o", "json"))

    def status(self) -> dict:
        """fleet status -o json, numbers as numbers, agents by host."""
        raw = self.json("fleet", "status")
        return {"revision": int(raw.get("revision", 0)), "policy_revision": int(raw.get("policyRevision", 0)),
                "leader": raw.get("leader", False), "controller": raw.get("controller", ""),
                "agents": {a["host"]: {"connected": a.get("connected", False),
                                       "applied": int(a.get("appliedRevision", 0)), "lag": int(a.get("lag", 0)),
                                       "last_seen": a.get("lastSeen", ""), "error": a.get("error", ""),
                                       "apply_ms": float(a.get("applyMs", 0.0))}
                           for a in raw.get("agents", [])}}

    def revisions(self) -> list[dict]:
        return self.json("policy", "revisions")

    def sessions(self) -> list[dict]:
        return self.json("session", "list")

    def push_policy(self, path: Path, *extra) -> int:
        """Pushes a policy; returns the new policy revision number."""
        out = self.ok("policy", "push", path, *extra)
        m = re.search(r"policy revision (\d+) active", out)
        assert m, out
        return int(m.group(1))

    def wait_in_sync(self, hosts, timeout: float = SYNC_TIMEOUT, since: str = "") -> dict:
        """Waits until every host is connected at the current revision with lag 0
        (and, with since, was last seen after that UTC time); returns the status."""
        last = {}

        def check():
            nonlocal last
            try:
                last = self.status()
            except AssertionError:
                return False
            agents = last["agents"]
            return all(h in agents and agents[h]["connected"] and agents[h]["lag"] == 0
                       and agents[h]["applied"] == last["revision"] and not agents[h]["error"]
                       and (not since or agents[h]["last_seen"] >= since) for h in hosts)

        assert wait_for(check, timeout=timeout, interval=0.2), f"agents not in sync: {json.dumps(last, indent=1)}"
        return last


def utc_now_text() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


# --- controller, agents, etcd --------------------------------------------------------------

class Controller:
    """`dataplane controller` as a process. port 0 picks one; restarts reuse it."""

    def __init__(self, registry: Registry, workdir: Path, store: str, tls_dir: Path, name: str = "ctl"):
        self.registry = registry
        self.workdir = workdir
        self.store = store
        self.tls_dir = tls_dir
        self.name = name
        self.port = 0
        self.proc: LoggedProcess | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "Controller":
        self.starts += 1
        log = self.workdir / f"controller-{self.name}-{self.starts}.log"
        self.proc = LoggedProcess([CLI, "controller", "--listen", f"127.0.0.1:{self.port}", "--store", self.store,
                                   "--tls-dir", self.tls_dir, "--name", self.name, "--metrics", "127.0.0.1:0"],
                                  log, self.registry)
        line = self.proc.wait_line(lambda l: " listening on " in l, timeout)
        assert line, f"controller did not start: {self.proc.describe()}"
        metrics = self.proc.wait_line(lambda l: "metrics on http://" in l, 1)
        assert metrics, self.proc.describe()
        self.metrics_port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", metrics).group(1))
        port = int(re.search(r"listening on \S+:(\d+) ", line).group(1))
        assert self.port in (0, port), line
        self.port = port
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return self.proc.stop(sig) if self.proc else None

    def scrape(self) -> dict:
        """{(sample name, frozenset(labels)): value} from the controller's /metrics."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


class AgentProcess:
    """`dataplane agent` in fleet mode for one host, attached in a namespace."""

    def __init__(self, registry: Registry, workdir: Path, host: str, controller: str, tls_dir: Path,
                 interface: str, netns: str, instance: str, endpoints: Path | None = None,
                 addresses: list[str] = ()):
        self.registry = registry
        self.workdir = workdir
        self.host = host
        self.instance = instance
        self.state_dir = workdir / f"state-{host}"
        self.argv = [CLI, "--instance", instance, "agent", "--controller", controller, "--tls-dir", tls_dir,
                     "--host", host, "--interface", interface, "--netns", netns, "--state-dir", self.state_dir]
        if endpoints:
            self.argv += ["--endpoints", endpoints]
        for a in addresses:
            self.argv += ["--address", a]
        registry.instances.add(instance)
        self.starts = 0
        self.proc: LoggedProcess | None = None

    def start(self) -> "AgentProcess":
        self.starts += 1
        self.proc = LoggedProcess(self.argv, self.workdir / f"agent-{self.host}-{self.starts}.log", self.registry)
        return self

    def wait_started(self, timeout: float = START_TIMEOUT) -> None:
        """Datapath loaded (or adopted) and attached, status socket up."""
        ok = self.proc.wait_line(lambda l: "attached to " in l, timeout)
        assert ok, f"agent {self.host} did not attach: {self.proc.describe()}"

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return self.proc.stop(sig) if self.proc else None

    @property
    def socket_path(self) -> str:
        return os.path.join(STATE_ROOT, self.instance, "agent.sock")

    def local_status(self, timeout: float = 5.0):
        from dataplane.v1 import agent_pb2, agent_pb2_grpc

        with grpc.insecure_channel(f"unix:{self.socket_path}") as ch:
            return agent_pb2_grpc.AgentStub(ch).Status(agent_pb2.AgentStatusRequest(), timeout=timeout)


def remove_instance(instance: str) -> None:
    """Unloads a datapath instance and removes what its agent left in /run."""
    dp = Datapath(instance)
    if os.path.isdir(dp.pin_dir) or os.path.exists(dp.state_path):
        dp.unload()
    run_dir = os.path.join(STATE_ROOT, instance)
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)


class Etcd:
    """A single-member etcd on loopback ports, data in a temporary directory."""

    def __init__(self, registry: Registry, workdir: Path):
        self.client_port, self.peer_port = free_port(), free_port()
        self.data = workdir / "etcd-data"
        name = tag("etcd")
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://127.0.0.1:{self.client_port}"
        self.proc = LoggedProcess([ETCD, "--name", name, "--data-dir", self.data, "--listen-client-urls", client,
                                   "--advertise-client-urls", client, "--listen-peer-urls", peer,
                                   "--initial-advertise-peer-urls", peer, "--initial-cluster", f"{name}={peer}",
                                   "--initial-cluster-state", "new", "--log-level", "warn"],
                                  workdir / "etcd.log", registry)
        assert wait_for(self._healthy, timeout=60, interval=0.2), f"etcd did not start: {self.proc.describe()}"

    def _healthy(self) -> bool:
        import urllib.request

        if not self.proc.running():
            return True  # let the caller's assertion report it
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.client_port}/health", timeout=2) as r:
                return json.loads(r.read()).get("health") == "true"
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

    def stop(self) -> None:
        self.proc.stop(signal.SIGTERM)


# --- direct gRPC ------------------------------------------------------------------------------

def read_pem(tls_dir: Path, stem: str) -> tuple[bytes, bytes]:
    return (tls_dir / f"{stem}.pem").read_bytes(), (tls_dir / f"{stem}.key").read_bytes()


def channel(address: str, ca: bytes, cert: bytes | None = None, key: bytes | None = None) -> grpc.Channel:
    """A TLS channel trusting ca, presenting (cert, key) when given."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(address, creds)


def controller_stub(ch: grpc.Channel) -> pb_grpc.ControllerStub:
    return pb_grpc.ControllerStub(ch)


class SyncCall:
    """An AgentSync.Sync stream opened with a hello and kept open until close()."""

    def __init__(self, ch: grpc.Channel, hello: pb.Hello, timeout: float = 15.0):
        self._done = threading.Event()

        def requests():
            yield pb.AgentMessage(hello=hello)
            self._done.wait(timeout)

        self.call = pb_grpc.AgentSyncStub(ch).Sync(requests(), timeout=timeout)

    def first(self) -> pb.ControllerMessage:
        """The controller's first message; raises grpc.RpcError if refused."""
        return next(self.call)

    def close(self) -> None:
        self._done.set()
        self.call.cancel()


def sync_refusal(ch: grpc.Channel, hello: pb.Hello) -> grpc.RpcError:
    """Opens a Sync stream that must be refused; returns the error."""
    call = SyncCall(ch, hello)
    try:
        msg = call.first()
    except grpc.RpcError as e:
        return e
    finally:
        call.close()
    raise AssertionError(f"Sync as {hello.host!r} was accepted: {msg.WhichOneof('msg')}")


def call_refusal(fn, request) -> grpc.RpcError:
    """Makes a unary call that must fail; returns the error."""
    try:
        reply = fn(request, timeout=15)
    except grpc.RpcError as e:
        return e
    raise AssertionError(f"call succeeded: {reply}")


# --- traffic ------------------------------------------------------------------------------------

def probe_cmd(*args) -> list[str]:
    return [sys.executable, "-u", "-m", "dataplane.probe", *map(str, args)]


def start_tcp_servers(lab: Lab, ns: str, addr: str, ports: list[int]) -> None:
    proc = lab.popen(ns, probe_cmd("serve-tcp", addr, *ports), cwd=ROOT)
    line = proc.stdout.readline().decode().strip()
    assert line == "ready", f"servers in {ns} did not start: {proc.stderr.read().decode()[-500:]}"


def tcp(lab: Lab, ns: str, src: str, dst: str, port: int, timeout: float) -> dict:
    """One TCP connect + echo from src (in namespace ns) to dst:port."""
    out = lab.run(ns, probe_cmd("tcp", src, dst, port, timeout), timeout=timeout + 60, cwd=ROOT)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    assert lines, f"tcp {src} -> {dst}:{port}: no result (exit {out.returncode}): {out.stderr[-1000:]}"
    return json.loads(lines[-1])


class Stream:
    """`probe stream` from src to dst:port: a line every few ms, each echo's
    arrival time (monotonic seconds) collected as it comes, so the probe never
    waits on its own output."""

    def __init__(self, lab: Lab, ns: str, src: str, dst: str, port: int):
        self.proc = lab.popen(ns, probe_cmd("stream", src, dst, port), cwd=ROOT)
        self.echoes: list[float] = []
        self.connected = False
        self.stalled: float | None = None
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        try:
            for raw in self.proc.stdout:
                f = raw.decode(errors="replace").split()
                with self._cond:
                    if f and f[0] == "connected":
                        self.connected = True
                    elif f and f[0] == "echo":
                        self.echoes.append(float(f[2]))
                    elif f and f[0] == "stalled":
                        self.stalled = float(f[1])
                    self._cond.notify_all()
        except (ValueError, OSError):
            pass  # closed under us at teardown
        with self._cond:
            self._cond.notify_all()

    def wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._reader.is_alive():
                    return predicate()
                self._cond.wait(min(left, 0.5))
            return True

    def describe(self) -> str:
        err = self.proc.stderr.read().decode(errors="replace")[-500:] if self.proc.poll() is not None else ""
        return f"connected {self.connected}, {len(self.echoes)} echoes, stalled {self.stalled}, exit " \
               f"{self.proc.poll()}: {err}"


def flows(lab: Lab, expected: list[tuple]) -> None:
    """Checks several flows at once: (namespace, src, dst, port, passes). A
    flow that must not pass must time out (dropped), not be refused."""
    from concurrent.futures import ThreadPoolExecutor

    def one(f):
        ns, src, dst, port, passes = f
        return tcp(lab, ns, src, dst, port, ALLOWED_WAIT if passes else DENIED_WAIT)

    with ThreadPoolExecutor(len(expected)) as pool:
        results = list(pool.map(one, expected))
    wrong = [f"{src} -> {dst}:tcp/{port}: expected {'pass' if passes else 'a drop (timeout)'}, got {r}"
             for (ns, src, dst, port, passes), r in zip(expected, results, strict=True)
             if (not r["ok"] if passes else (r["ok"] or r.get("error") != "TimeoutError"))]
    assert not wrong, "\n".join(wrong)


# --- the three-host fleet ------------------------------------------------------------------------

@dataclasses.dataclass
class Fleet:
    lab: Lab
    workdir: Path
    controller: Controller
    admin: Admin
    ns: dict                      # host -> namespace
    agents: dict                  # host -> AgentProcess
    db_ports: tuple = (DB_PORT,)
    app_ports: tuple = ()
    pushes: int = 0

    def push_policy(self, db_ports=None, app_ports=None) -> int:
        """Pushes fleet_policy(...) through the CLI; returns the policy revision."""
        self.db_ports = tuple(db_ports) if db_ports is not None else self.db_ports
        self.app_ports = tuple(app_ports) if app_ports is not None else self.app_ports
        self.pushes += 1
        path = self.workdir / f"policy-{self.pushes}.yaml"
        path.write_text(fleet_policy(self.db_ports, self.app_ports))
        return self.admin.push_policy(path)

    def ensure_alice(self) -> None:
        """alice's session, on device host A, open."""
        if not any(s["id"] == ALICE_SESSION for s in self.admin.sessions()):
            self.admin.ok("session", "open", "--user", "alice", "--group", "staff", "--device", "laptop-alice",
                          "--posture", "managed=true", "--address", ALICE_ADDR, "--host", "A")

    def snapshots(self) -> dict:
        return {h: datapath_snapshot(a.instance) for h, a in self.agents.items()}

    def applied_lines(self, host: str, start: int = 0) -> list[str]:
        return [l for l in self.agents[host].proc.lines(start) if re.search(r"revision \d+ (NOT )?applied in", l)]


# --- the datapath ---------------------------------------------------------------------------------

def datapath_snapshot(instance: str) -> dict:
    """What an instance enforces: live generation, epoch, and its maps' live content."""
    dp = Datapath(instance).adopt()
    try:
        policy, layout = tables.read_policy(dp)
        return {"generation": tables.active_generation(dp), "epoch": dp.read_config().epoch,
                "audit": tables.live_audit_default(dp),
                "ipcache": sorted((str(n), v) for n, v in tables.read_ipcache(dp).items()),
                "policy": sorted(policy.items()), "ranges": sorted(layout["sets"].items())}
    finally:
        dp.close()


def reason_count(instance: str, reason) -> int:
    dp = Datapath(instance).adopt()
    try:
        return dp.reason_counters().get(reason, (0, 0))[0]
    finally:
        dp.close()
