"""Pieces of the etcd high-availability tests: a throwaway etcd on
loopback, controller processes on it (mutual TLS), the `dataplane` CLI as
an admin, lightweight in-process agents, a real agent process with a
datapath in a namespace, and the state each host should converge to,
computed from etcd independently of the controllers.

Everything a Fleet starts is stopped and removed by close(), in reverse
order, even when the test fails half-way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc

from dataplane import certs
from dataplane.fleet import HostView, State
from dataplane.fleet_agent import FleetAgent, FleetOptions, channel_to
from dataplane.lab import Lab
from dataplane.store import EtcdStore
from dataplane.v1 import controller_pb2 as pb
from dataplane.v1 import controller_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / ".venv" / "bin" / "dataplane"
if not CLI.exists():  # installed elsewhere: take the one on PATH
    CLI = Path(shutil.which("dataplane") or CLI)
ETCD = shutil.which("etcd") or "/usr/bin/etcd"
RUN_DIR = Path("/run/dataplane")          # agent status sockets (dataplane.agent_server)

START_TIMEOUT = 30.0      # a process (etcd, a controller) to answer
ADMIN = "admin"


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now (held together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(predicate, timeout: float, interval: float = 0.05):
    """predicate() until truthy or timeout; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def _stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signals the process group proc leads and waits; SIGKILL if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=timeout)
    else:
        proc.wait()


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


# --- etcd --------------------------------------------------------------------------------

class Etcd:
    """One etcd member on loopback, its data in workdir/etcd. stop() and
    start() again keep the data (an outage, not a new cluster)."""

    def __init__(self, workdir: Path):
        self.client_port, self.peer_port = free_ports(2)
        self.data_dir = workdir / "etcd"
        self.log = workdir / "etcd.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        client, peer = f"http://{self.endpoint}", f"http://127.0.0.1:{self.peer_port}"
        self.starts += 1
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [ETCD, "--name", "ha", "--data-dir", str(self.data_dir), "--logger", "zap",
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"ha={peer}", "--initial-cluster-state", "new"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        if not wait_until(self.healthy, START_TIMEOUT, 0.1):
            raise AssertionError(f"etcd did not come up on {self.endpoint}: {_tail(self.log)}")

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGTERM)
            self.proc = None

    def state(self) -> State:
        """The committed state as etcd holds it (a reader, not a controller)."""
        store = EtcdStore([("127.0.0.1", self.client_port)])
        try:
            rows, _ = store.load()
        finally:
            store.close()
        return State.from_rows(rows)


# --- controllers --------------------------------------------------------------------------

class Controller:
    """A `dataplane controller` process on etcd, with mutual TLS."""

    def __init__(self, name: str, etcd: Etcd, pki: Path, workdir: Path):
        self.name = name
        self.port = free_ports(1)[0]
        self.etcd = etcd
        self.pki = pki
        self.log = workdir / f"controller-{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [str(CLI), "controller", "--listen", self.address, "--store", f"etcd://{self.etcd.endpoint}",
                 "--name", self.name, "--tls-dir", str(self.pki)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)

    def wait_ready(self) -> None:
        def answers():
            if self.proc.poll() is not None:
                raise AssertionError(f"controller {self.name} exited {self.proc.returncode}: {_tail(self.log)}")
            try:
                return admin_rpc(self.address, self.pki, "FleetStatus", pb.FleetStatusRequest(), timeout=2)
            except grpc.RpcError:
                return None
        if not wait_until(answers, START_TIMEOUT, 0.1):
            raise AssertionError(f"controller {self.name} does not answer on {self.address}: {_tail(self.log)}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            _stop_group(self.proc, sig)

    def log_tail(self, n: int = 15) -> str:
        return _tail(self.log, n)


# --- admin ------------------------------------------------------------------------------

def admin_rpc(address: str, pki: Path, method: str, request, timeout: float = 5.0):
    """One admin RPC to one controller over mutual TLS; raises grpc.RpcError."""
    with channel_to(address, certs.Credentials(pki, f"admin-{ADMIN}")) as channel:
        return getattr(pb_grpc.ControllerStub(channel), method)(request, timeout=timeout)


def cli(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, check=False)


# --- agents -------------------------------------------------------------------------------

class LightAgent:
    """FleetAgent without a datapath, in a thread of the test process: it
    keeps its host's state and reports it applied, like a real agent."""

    def __init__(self, host: str, controllers: list[str], pki: Path, state_dir: Path):
        self.host = host
        # Each light agent runs one job of its own, registered when it connects.
        job = pb.Endpoint(name=f"job-{host}", addresses=[f"10.90.3.{host[1:]}"], labels={"app": "job"})
        self.agent = FleetAgent(None, FleetOptions(controllers=list(controllers), host=host,
                                                   tls=certs.Credentials(pki, f"agent-{host}"),
                                                   state_dir=str(state_dir), endpoints=[job]))
        self._lock = threading.Lock()
        self.applied: list[tuple[int, str]] = []      # (revision, digest) of every apply
        self.agent.on_applied = self._on_applied
        self.thread = threading.Thread(target=self.agent.run, name=f"agent-{host}", daemon=True)

    def _on_applied(self, view: HostView, ms: float) -> None:
        with self._lock:
            self.applied.append((view.revision, view.digest()))

    def start(self) -> None:
        self.thread.start()

    def enforced(self) -> tuple[int, str]:
        view = self.agent.view
        return (view.revision, view.digest()) if view else (0, "")

    def applies(self) -> int:
        with self._lock:
            return len(self.applied)

    def stop(self) -> None:
        self.agent.stop()
        self.thread.join(timeout=15)


class RealAgent:
    """`dataplane agent` in fleet mode, its datapath attached to a veth in
    a namespace of its own; state dir in the workdir."""

    def __init__(self, lab: Lab, host: str, controllers: list[str], pki: Path, workdir: Path, address: str):
        self.host = host
        self.instance = f"ha_{host}_{os.getpid()}"
        self.ns = lab.ns(host)
        peer = lab.ns(f"{host}p")
        self.ifname, _ = lab.link(self.ns, peer, [f"{address}/24"], [])
        self.state_dir = workdir / f"state-{host}"
        self.log = workdir / f"agent-{host}.log"
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [str(CLI), "--instance", self.instance, "agent", "--controller", ",".join(controllers),
                 "--tls-dir", str(pki), "--host", host, "--interface", self.ifname, "--netns", self.ns,
                 "--state-dir", str(self.state_dir), "--address", address],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)

    def status(self):
        """Agent.Status from the agent's own socket, None while it does not answer."""
        from dataplane.agent_server import socket_path
        from dataplane.v1 import agent_pb2, agent_pb2_grpc

        with grpc.insecure_channel(f"unix:{socket_path(self.instance)}") as channel:
            try:
                return agent_pb2_grpc.AgentStub(channel).Status(agent_pb2.AgentStatusRequest(), timeout=2)
            except grpc.RpcError:
                return None

    def enforced(self) -> tuple[int, str]:
        """(revision, digest) the agent says it enforces; the digest is
        marked when the record of its last apply to the kernel disagrees."""
        st = self.status()
        if st is None or not st.digest:
            return (0, "")
        try:
            applied = json.loads((self.state_dir / "applied.json").read_text())["digest"]
        except (OSError, ValueError, KeyError):
            applied = ""
        return (st.revision, st.digest if applied == st.digest else f"{st.digest} (kernel: {applied or 'none'})")

    def identities(self) -> dict:
        """The live generation's ipcache in the kernel: prefix text -> identity."""
        from loader import tables
        from loader.instance import Datapath

        dp = Datapath(self.instance).adopt()
        try:
            return {str(n): int(i) for n, i in tables.read_identities(dp).items()}
        finally:
            dp.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 15) -> str:
        return _tail(self.log, n)

    def stop(self) -> None:
        _stop_group(self.proc, signal.SIGTERM)
        unload(self.instance)
        shutil.rmtree(RUN_DIR / self.instance, ignore_errors=True)


def unload(instance: str) -> None:
    """Detaches and unpins an instance with `dataplane bpf unload`, in a
    process of its own: detaching in a namespace goes through pyroute2,
    which forks, and a fork of this multi-threaded process (gRPC) can hang."""
    from loader.instance import Datapath

    dp = Datapath(instance)
    if os.path.isdir(dp.pin_dir) or os.path.exists(dp.state_path):
        out = cli("--instance", instance, "bpf", "unload", timeout=120)
        if out.returncode != 0:
            raise AssertionError(f"bpf unload {instance}: {out.stderr.strip()}")


# --- the whole fleet ------------------------------------------------------------------------

class Fleet:
    """etcd, controllers, agents and their files, all under one tmp dir."""

    def __init__(self, controllers: list[str], light_hosts: list[str], real_hosts: list[str]):
        self.workdir = Path(tempfile.mkdtemp(prefix="dp-etcd-ha-"))
        self.pki = self.workdir / "pki"
        self.lab = Lab()
        self.etcd = Etcd(self.workdir)
        self.controllers: dict[str, Controller] = {}
        self.light: dict[str, LightAgent] = {}
        self.real: dict[str, RealAgent] = {}
        self._controller_names = controllers
        self._light_hosts = light_hosts
        self._real_hosts = real_hosts

    # -- lifecycle --

    def start_infrastructure(self) -> None:
        """Certificates, etcd and the controllers (ready to answer)."""
        hosts = self._light_hosts + self._real_hosts
        out = cli("certs", "init", "--dir", self.pki, "--controller", "localhost,127.0.0.1",
                  "--agent", ",".join(hosts), "--admin", ADMIN)
        assert out.returncode == 0, f"certs init: {out.stderr}"
        self.etcd.start()
        for name in self._controller_names:
            self.controllers[name] = Controller(name, self.etcd, self.pki, self.workdir)
        for c in self.controllers.values():
            c.start()
        for c in self.controllers.values():
            c.wait_ready()

    @property
    def addresses(self) -> list[str]:
        return [c.address for c in self.controllers.values()]

    def start_real_agents(self, addresses: dict[str, str], order: dict[str, list[str]] | None = None) -> None:
        """addresses: host -> its own address; order as for start_light_agents."""
        for host in self._real_hosts:
            self.real[host] = RealAgent(self.lab, host, (order or {}).get(host, self.addresses), self.pki,
                                        self.workdir, addresses[host])

    def start_light_agents(self, order: dict[str, list[str]] | None = None) -> None:
        """order: host -> controller addresses in the order that agent tries them."""
        for host in self._light_hosts:
            addrs = (order or {}).get(host, self.addresses)
            self.light[host] = LightAgent(host, addrs, self.pki, self.workdir / f"light-{host}")
            self.light[host].start()

    def close(self) -> None:
        errors = []
        for step in ([a.stop for a in self.light.values()] + [a.stop for a in self.real.values()]
                     + [c.kill for c in self.controllers.values()] + [self.etcd.stop, self.lab.close]):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - clean up the rest, report at the end
                errors.append(f"{getattr(step, '__qualname__', step)}: {e!r}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        errors += self.leftovers()
        if errors:
            raise AssertionError("cleanup: " + "; ".join(errors))

    def leftovers(self) -> list[str]:
        """What close() should have removed and still exists."""
        from loader.instance import PIN_ROOT, STATE_ROOT

        found = []
        procs = [c.proc for c in self.controllers.values()] + [self.etcd.proc] + [a.proc for a in self.real.values()]
        found += [f"process {p.pid} still running: {p.args}" for p in procs if p is not None and p.poll() is None]
        found += [f"agent thread {h} still running" for h, a in self.light.items() if a.thread.is_alive()]
        for a in self.real.values():
            found += [f"{p} exists" for p in (Path(PIN_ROOT) / a.instance, Path(STATE_ROOT) / a.instance,
                                              RUN_DIR / a.instance) if p.exists()]
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
        found += [f"network namespace {line.split()[0]} exists" for line in netns.splitlines()
                  if line.startswith(self.lab.prefix + "-")]
        if self.workdir.exists():
            found.append(f"{self.workdir} exists")
        return found

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- admin views --

    def status(self, controller: str) -> dict:
        """`dataplane fleet status -o json` against one controller."""
        c = self.controllers[controller]
        out = cli("fleet", "status", "-o", "json", "--controller", c.address, "--tls-dir", self.pki,
                  "--as", ADMIN, "--timeout", 5)
        assert out.returncode == 0, f"fleet status on {controller}: exit {out.returncode}: {out.stderr}"
        return json.loads(out.stdout)

    def leaders(self) -> list[str]:
        """Names of the live controllers whose fleet status says leader."""
        return [name for name, c in self.controllers.items() if c.alive() and self.status(name)["leader"]]

    def admin(self, *args, controllers: list[str] | None = None) -> subprocess.CompletedProcess:
        """An admin command through the CLI, given the controller names to try in order."""
        addrs = [self.controllers[n].address for n in controllers] if controllers else self.addresses
        return cli(*args, "--controller", ",".join(addrs), "--tls-dir", self.pki, "--as", ADMIN)

    def rpc(self, controller: str, method: str, request, timeout: float = 5.0):
        return admin_rpc(self.controllers[controller].address, self.pki, method, request, timeout)

    def write_file(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def expected(self) -> tuple[int, dict[str, str]]:
        """(state revision, host -> digest) that agents must converge to,
        compiled here from what etcd holds."""
        state = self.etcd.state()
        compiler = state.compiler()
        digests = {}
        for host in list(self.light) + list(self.real):
            digests[host] = HostView.of(compiler.compile(host), state.revision).digest()
        return state.revision, digests

    def enforced(self) -> dict[str, tuple[int, str]]:
        out = {h: a.enforced() for h, a in self.light.items()}
        out.update({h: a.enforced() for h, a in self.real.items()})
        return out

    def converged(self, revision: int, digests: dict[str, str]) -> bool:
        return all(v == (revision, digests[h]) for h, v in self.enforced().items())

    def describe(self) -> str:
        lines = [f"enforced: {self.enforced()}"]
        for h, a in self.light.items():
            lines.append(f"agent {h}: {a.agent.status()}")
        for h, a in self.real.items():
            lines.append(f"agent {h} (process, alive {a.alive()}):\n{a.log_tail()}")
        for name, c in self.controllers.items():
            lines.append(f"controller {name} (alive {c.alive()}):\n{c.log_tail()}")
        return "\n".join(lines)
