"""The agent in fleet mode: its host's state comes from a controller.

    dataplane agent --controller ctl1:7443,ctl2:7443 --tls-dir /etc/dataplane/pki \\
        --host web-host --interface eth0 [--endpoints FILE] [--address ADDR]

It opens a Sync stream, says which host it is (and the workloads it runs),
receives a snapshot of the host's compiled state (or "in sync" when it
already enforces it) and then deltas, applies each through the atomic
apply path, and reports the revision it applied. When the controller goes
away it keeps enforcing what it has (fail-static) and reconnects with
backoff, trying each controller in turn; the state it enforces is saved
locally, so a restarted agent resumes without reapplying anything.

Before applying a state it checks that the state would not cut the agent
off from its controllers (see check_control_channel); such a state is
refused and reported unless --allow-control-lockout is given. A datapath
that holds no state yet gets a bootstrap state that lets the agent reach
its controllers (see bootstrap_view) until the first state arrives.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
import logging
import os
import queue
import socket
import threading
import time
from pathlib import Path

import grpc

from dataplane import certs
from dataplane.agent import CapacityError, Workspace
from dataplane.fleet import HostView, utcnow
from dataplane.v1 import controller_pb2 as pb
from dataplane.v1 import controller_pb2_grpc as pb_grpc
from loader import tables
from loader.abi import Direction, ReservedIdentity, Verdict
from loader.errors import DataplaneError
from loader.model import Decision, Model
from loader.tables import PolicyEntry

log = logging.getLogger("dataplane.agent")

BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0


@dataclasses.dataclass
class FleetOptions:
    controllers: list
    host: str
    tls: certs.Credentials | None = None
    interfaces: list = dataclasses.field(default_factory=list)
    netns: str | None = None
    ingress: str = "xdp"
    state_dir: str | None = None
    endpoints: list = dataclasses.field(default_factory=list)   # pb.Endpoint
    addresses: list = dataclasses.field(default_factory=list)
    metrics: str | None = None          # HOST:PORT of the Prometheus endpoint; None: off
    upload_flows: bool = True           # send the datapath's flows to the controller
    allow_control_lockout: bool = False  # apply a state even if it drops this agent's own controller connection


UPLOAD_BATCH = 256          # flows per FlowBatch at most
UPLOAD_INTERVAL_S = 0.2     # a partial batch waits at most this long
UPLOAD_BACKLOG = 16         # batches queued for the stream before new ones are dropped (and counted)


def load_endpoints(path: str) -> list:
    """Endpoints this host runs, from a YAML/JSON list of {name, address(es), labels}."""
    from dataplane.inventory import parse_inventory
    from dataplane.source import loads

    text = Path(path).read_text()
    data, where = loads(text, path)
    if not isinstance(data, list):
        raise DataplaneError(f"{path}: a list of endpoints ({{name, addresses, labels}})")
    doc = {"apiVersion": "zt-dataplane/v1", "hosts": [{"name": "this-host"}],
           "endpoints": [{**e, "host": "this-host"} if isinstance(e, dict) else e for e in data]}
    inv = parse_inventory(doc, where)
    return [pb.Endpoint(name=e.name, addresses=[str(a) for a in e.addresses],
                        labels={k: ",".join(sorted(v)) if isinstance(v, frozenset) else v
                                for k, v in e.labels.items()}) for e in inv.endpoints]


# -- the control channel failsafe --
#
# The agent reaches its controller over TCP from an address of this host. If
# that connection leaves through an interface the agent enforces on, the
# state the agent applies judges it like any flow: an established connection
# is judged again after every apply (the epoch changes), as its first packet
# was, i.e. as a new egress flow from this host to the controller's port.
# Every attachment holds the egress hook, so that egress decision is the one
# that keeps or cuts the channel (replies ride on the conntrack entry it
# leaves). A state that denies it would leave the agent unreachable and
# unfixable from the controller: such a state is refused.

class ControlLockout(DataplaneError):
    """A state that would cut the agent off from a controller."""


@dataclasses.dataclass(frozen=True)
class ControlFlow:
    """The agent's connection to one address of a controller, as its datapath sees it."""

    controller: str     # as given in --controller
    local: str          # this host's address the connection leaves from
    remote: str         # the controller's address
    port: int

    def text(self) -> str:
        remote = f"[{self.remote}]" if ":" in self.remote else self.remote
        return f"{self.local} -> {remote}:{self.port}/tcp"


def split_target(target: str) -> tuple[str, int]:
    """'name:port', 'a.b.c.d:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"controller address {target!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"controller address {target!r}: write an IPv6 address as [ADDR]:PORT")
    return host, int(port)


def resolve_all(host: str, port: int) -> list[str]:
    """Every address a controller's name resolves to (an address: itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    out: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in out:
            out.append(sockaddr[0])
    return out


def local_address_to(remote: str, port: int) -> str:
    """The source address this host uses towards remote, found without
    sending anything (connect() on a UDP socket only picks a route)."""
    family = socket.AF_INET6 if ipaddress.ip_address(remote).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((remote, port))
        return s.getsockname()[0].split("%", 1)[0]


def enforced_route(interfaces: list, netns: str | None):
    """A predicate: does this process's traffic to an address leave through
    one of the interfaces the agent enforces on? None when it never can: the
    interfaces live in another network namespace than the agent (--netns),
    or there are none."""
    if not interfaces or (netns and not _same_netns(netns)):
        return None
    indexes = set()
    for name in interfaces:
        try:
            indexes.add(socket.if_nametoindex(name))
        except OSError:
            pass

    def crosses(remote: str) -> bool:
        from pyroute2 import IPRoute

        try:
            with IPRoute() as ipr:
                routes = ipr.route("get", dst=remote)
            return any(r.get_attr("RTA_OIF") in indexes for r in routes)
        except Exception as e:   # no route, or netlink trouble: judge it rather than assume it is safe
            log.debug("route to %s not found (%s): checking the controller connection anyway", remote, e)
            return True

    return crosses


def _same_netns(netns: str) -> bool:
    try:
        theirs, ours = os.stat(f"/run/netns/{netns}"), os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def control_flows(controllers: list, crosses, resolve=resolve_all, local_of=local_address_to) -> tuple[list, list]:
    """(ControlFlow for every address of every controller whose route
    crosses an enforced interface, problems: names that did not resolve)."""
    flows, problems = [], []
    if crosses is None:
        return flows, problems
    for target in controllers:
        try:
            host, port = split_target(target)
            addresses = resolve(host, port)
        except (ValueError, OSError) as e:
            problems.append(f"{target}: {e}")
            continue
        for remote in addresses:
            if not crosses(remote):
                continue
            try:
                local = local_of(remote, port)
            except OSError as e:      # no route at all: there is no connection to keep
                problems.append(f"{target} ({remote}): {e}")
                continue
            flows.append(ControlFlow(target, local, remote, port))
    return flows, problems


def view_model(view: HostView, now: dt.datetime | None = None) -> Model:
    """The datapath's decisions under view; ipcache entries already expired
    do not count (the datapath ignores them too)."""
    now = now or utcnow()
    live = {}
    for prefix, (ident, expires) in view.ipcache.items():
        if expires and dt.datetime.fromisoformat(expires) <= now:
            continue
        live[prefix] = ident
    return Model.from_entries(live, view.entries, view.audit_default)


@dataclasses.dataclass(frozen=True)
class Lockout:
    flow: ControlFlow
    decision: Decision
    rule: str           # the rule's name, or "" for the default deny

    def text(self) -> str:
        by = f"rule {self.rule}" if self.rule else "the default deny (no rule allows it)"
        return (f"it would cut this agent off from controller {self.flow.controller}: {self.flow.text()} "
                f"denied at egress by {by}")


def check_control_channel(view: HostView, flows: list, now: dt.datetime | None = None) -> Lockout | None:
    """The first control flow view would drop, or None. Audit passes."""
    if not flows:
        return None
    model = view_model(view, now)
    for f in flows:
        d = model.judge(f.local, f.remote, socket.IPPROTO_TCP, f.port, Direction.EGRESS)
        if d.verdict == Verdict.DENY:
            rule = view.rule_names.get(d.rule_id, str(d.rule_id)) if d.rule_id else ""
            return Lockout(f, d, rule)
    return None


# -- the bootstrap state --
#
# A freshly loaded datapath denies everything, so an agent whose controller
# connection crosses an enforced interface could never make its first
# connection. Before it, an agent whose datapath has never been given a
# state applies the smallest state that lets that connection through: this
# host's source address(es) towards its controllers are the host, each
# controller address is the reserved controller identity, and the host may
# open TCP connections to that identity on the controller's port (replies
# ride on the conntrack entry). Everything else stays denied. The
# controller's first state replaces it like any other. A datapath that
# holds a state, whoever applied it, is left alone (fail-static).

BOOTSTRAP_RULE = "bootstrap-control-channel"


def _host_prefix(address: str) -> str:
    return str(ipaddress.ip_network(address))


def bootstrap_view(host: str, flows: list, rule_id: int) -> HostView:
    """The state that allows exactly the control flows (see above). A local
    address that is also a controller's (a controller on this host) stays
    the host."""
    ipcache = {_host_prefix(f.local): (int(ReservedIdentity.HOST), "") for f in flows}
    for f in flows:
        ipcache.setdefault(_host_prefix(f.remote), (int(ReservedIdentity.CONTROLLER), ""))
    entries = frozenset(PolicyEntry(int(ReservedIdentity.HOST), ipcache[_host_prefix(f.remote)][0],
                                    int(Direction.EGRESS), socket.IPPROTO_TCP, f.port, f.port, int(Verdict.ALLOW),
                                    rule_id) for f in flows)
    return HostView(0, host, ipcache, entries, False, {rule_id: BOOTSTRAP_RULE} if flows else {},
                    {int(ReservedIdentity.CONTROLLER): "reserved=controller"}, [])


def datapath_blank(dp) -> bool:
    """True when no state was ever written into the maps: no identity and no
    policy entry in either generation, and the default is deny (a datapath
    put in audit mode by hand was given a state too)."""
    if tables.live_audit_default(dp):
        return False
    return not any(tables.read_ipcache(dp, gen) or tables.read_policy(dp, gen)[0] for gen in (0, 1))


def channel_to(address: str, tls: certs.Credentials | None) -> grpc.Channel:
    options = [("grpc.keepalive_time_ms", 5000), ("grpc.keepalive_timeout_ms", 3000),
               ("grpc.keepalive_permit_without_calls", 1)]
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert)
    return grpc.secure_channel(address, creds, options=options)


class FleetAgent:
    def __init__(self, dp, opts: FleetOptions):
        self.dp = dp                      # None: a lightweight agent that keeps state without a datapath
        self.opts = opts
        self.ws = Workspace(dp.instance if dp else f"light-{opts.host}", opts.state_dir)
        self.view: HostView | None = self._load_view()
        self.connected_to = ""
        self.last_error = ""
        self.applied_at = ""
        self._stop = threading.Event()
        self._call = None
        self.connected_once = False
        self.on_applied = None           # callback(view, apply_ms), for benchmarks and tests
        self.telemetry = None
        self.upload_lost = 0
        self._names = None

    @property
    def names(self):
        """flows.Names of the view in force, built when first asked for."""
        names = self._names
        if names is None or names.revision != (self.view.revision if self.view else 0):
            names = self._names = self._names_of(self.view)
        return names

    def _names_of(self, view):
        from dataplane.flows import Names

        if view is None:
            return Names(host=self.opts.host)
        return Names.build(self.opts.host, view.revision, view.audit_default, view.rule_names,
                           view.identity_labels, view.entries)

    def _set_view(self, view) -> None:
        self.view = view
        self._names = None

    # -- local record of what is enforced --

    def _view_path(self) -> Path:
        return self.ws.dir / "host-state.json"

    def _load_view(self) -> HostView | None:
        try:
            d = json.loads(self._view_path().read_text())
        except (FileNotFoundError, ValueError):
            return None
        from loader.tables import PolicyEntry

        return HostView(d["revision"], d["host"], {k: tuple(v) for k, v in d["ipcache"].items()},
                        frozenset(PolicyEntry(*e) for e in d["entries"]), d["audit_default"],
                        {int(k): v for k, v in d["rule_names"].items()},
                        {int(k): v for k, v in d["identity_labels"].items()}, d["locals"], d.get("next_change", ""))

    def _save_view(self, view: HostView) -> None:
        if self.dp is None:
            return
        self.ws.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        d = dataclasses.asdict(view)
        d["entries"] = sorted(dataclasses.astuple(e) for e in view.entries)
        tmp = self._view_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(d))
        tmp.replace(self._view_path())

    # -- datapath --

    def start(self) -> None:
        if self.dp is None:
            return
        from dataplane.telemetry import Telemetry

        outcome = self.dp.load()
        log.info("datapath %s (%s)", self.dp.instance, outcome)
        try:
            self.bootstrap()
        except DataplaneError as e:
            log.error("bootstrap state not applied: %s", e)
        for ifname in self.opts.interfaces:
            rec = self.dp.attach(ifname, self.opts.netns, ingress=self.opts.ingress)
            log.info("attached to %s%s (%s)", ifname, f" in {self.opts.netns}" if self.opts.netns else "",
                     rec.get("xdp_mode", "tc"))
        self.telemetry = Telemetry(self.dp, self.opts.host, lambda: self.names, self._agent_stats,
                                   metrics=self.opts.metrics).start()

    def _agent_stats(self) -> dict:
        import datetime as dt

        applied = dt.datetime.fromisoformat(self.applied_at).timestamp() if self.applied_at else 0.0
        return {"mode": "fleet", "connected": bool(self.connected_to), "applied_at": applied,
                "flows_upload_lost": self.upload_lost}

    def apply(self, view: HostView) -> tuple[str, float]:
        """Enforces view; returns (error or "", milliseconds)."""
        t0 = time.monotonic()
        try:
            if self.dp is not None:
                self._check_control_channel(view)
                result = self._write_state(view)
                self.ws.write_applied({
                    "host": view.host, "applied_at": utcnow().isoformat(), "mode": "audit" if view.audit_default
                    else "enforce", "sources": {"controller": self.connected_to}, "revision": view.revision,
                    "digest": view.digest(), "generation": result.generation, "epoch": result.epoch,
                    "counts": {"prefixes": len(view.ipcache), "entries": len(view.entries),
                               "rules": len(view.rule_names), "identities": len(view.identity_labels)},
                    "rules": {str(k): v for k, v in sorted(view.rule_names.items())},
                    "actions": self._names_of(view).actions_record(),
                    "identities": {str(k): v for k, v in sorted(view.identity_labels.items())},
                    "locals": view.locals, "warnings": [], "next_change": view.next_change or None})
                self._save_view(view)
        except DataplaneError as e:
            log.error("revision %d not applied, the state in force stays: %s", view.revision, e)
            return str(e), (time.monotonic() - t0) * 1000
        self._set_view(view)
        self.applied_at = utcnow().isoformat()
        ms = (time.monotonic() - t0) * 1000
        if self.on_applied:
            self.on_applied(view, ms)
        return "", ms

    def _write_state(self, view: HostView) -> tables.ApplyResult:
        """One atomic switch of the maps to view (nothing written if it does not fit)."""
        ipcache = view.loader_ipcache()
        layout = tables.layout_policy(view.entries)
        problems = tables.check_capacity(self.dp, ipcache, view.entries, layout=layout)
        if problems:
            raise CapacityError("does not fit: " + "; ".join(problems))
        return tables.apply_state(self.dp, ipcache, view.entries, audit_default=view.audit_default, layout=layout)

    def _control_flows(self, what: str) -> list:
        flows, problems = control_flows(self.opts.controllers, enforced_route(self.opts.interfaces, self.opts.netns))
        for p in problems:
            log.warning("control channel %s for %s", what, p)
        return flows

    def bootstrap(self, flows: list | None = None) -> HostView | None:
        """Applies bootstrap_view when the controller connection crosses an
        enforced interface and nothing ever gave the datapath a state (no
        state recorded by this agent's workspace, blank maps); returns the
        state applied, or None. flows: the control flows (default: found by
        routing, as the failsafe finds them)."""
        flows = self._control_flows("not bootstrapped") if flows is None else flows
        if not flows:
            return None
        try:
            recorded = self.view is not None or self.ws.read_applied() is not None
        except DataplaneError:       # a corrupt record still says something was applied
            recorded = True
        if recorded or not datapath_blank(self.dp):
            log.debug("the datapath holds a state: no bootstrap state, the state in force stays")
            return None
        view = bootstrap_view(self.opts.host, flows, rule_id=self.dp.rules.max_entries - 1)
        self._write_state(view)
        self._names = self._names_of(view)
        log.info("no state in the datapath yet: bootstrap state applied, allowing only %s until the "
                 "controller's first state", ", ".join(f.text() for f in flows))
        return view

    def _check_control_channel(self, view: HostView) -> None:
        """Raises ControlLockout if view would cut this agent off from a
        controller (unless --allow-control-lockout: then it only warns)."""
        flows = self._control_flows("not checked")
        lockout = check_control_channel(view, flows)
        if lockout is None:
            return
        if self.opts.allow_control_lockout:
            log.warning("revision %d: %s; applied anyway (--allow-control-lockout)", view.revision, lockout.text())
            return
        raise ControlLockout(f"refused: {lockout.text()}; --allow-control-lockout would apply it")

    # -- the stream --

    def hello(self) -> pb.AgentMessage:
        return pb.AgentMessage(hello=pb.Hello(
            host=self.opts.host, interfaces=self.opts.interfaces, addresses=self.opts.addresses,
            endpoints=self.opts.endpoints, revision=self.view.revision if self.view else 0,
            digest=self.view.digest() if self.view else "", version="zt-dataplane/1"))

    def session(self, address: str) -> None:
        """One Sync stream until it ends; raises grpc.RpcError on failure."""
        outq: queue.Queue = queue.Queue()
        outq.put(self.hello())

        def requests():
            while True:
                m = outq.get()
                if m is None:
                    return
                yield m

        with channel_to(address, self.opts.tls) as channel:
            call = pb_grpc.AgentSyncStub(channel).Sync(requests())
            self._call = call
            uploading = threading.Event()
            if self.telemetry is not None and self.opts.upload_flows:
                uploading.set()
                threading.Thread(target=self._upload_flows, args=(outq, uploading), name="flow-upload",
                                 daemon=True).start()
            # The controller sends each delta from the last state it sent,
            # whether or not it was applied: a refused state is still the base.
            received = None
            try:
                for msg in call:
                    self.connected_to = address
                    kind = msg.WhichOneof("msg")
                    self.connected_once = True
                    if kind == "in_sync":
                        # Same maps, perhaps a newer revision: record it, apply nothing.
                        log.info("in sync with %s at revision %d", address, msg.in_sync.revision)
                        self._set_view(dataclasses.replace(self.view, revision=msg.in_sync.revision))
                        self._save_view(self.view)
                        received = self.view
                        outq.put(pb.AgentMessage(applied=pb.Applied(revision=msg.in_sync.revision,
                                                                    digest=self.view.digest())))
                        continue
                    if kind == "snapshot":
                        new = HostView.from_msg(msg.snapshot)
                        expected = msg.snapshot.digest
                    else:
                        d = msg.delta
                        if received is None or d.from_revision != received.revision:
                            raise DataplaneError(f"delta from revision {d.from_revision} does not fit revision "
                                                 f"{received.revision if received else 0}: resynchronising")
                        new = received.apply_delta(d)
                        expected = d.digest
                    if new.digest() != expected:
                        raise DataplaneError("state digest mismatch after a delta: resynchronising")
                    received = new
                    if self.view is not None and new.digest() == self.view.digest():
                        # A change elsewhere: same maps, nothing to switch or re-judge.
                        self._set_view(new)
                        self._save_view(new)
                        outq.put(pb.AgentMessage(applied=pb.Applied(revision=new.revision, digest=new.digest())))
                        continue
                    error, ms = self.apply(new)
                    log.info("revision %d %s in %.1f ms", new.revision, "NOT applied" if error else "applied", ms)
                    outq.put(pb.AgentMessage(applied=pb.Applied(revision=new.revision if not error else
                                                                (self.view.revision if self.view else 0),
                                                                digest=self.view.digest() if self.view else "",
                                                                error=error, apply_ms=ms)))
            finally:
                uploading.clear()
                outq.put(None)
                self._call = None
                self.connected_to = ""

    def _upload_flows(self, outq: queue.Queue, uploading: threading.Event) -> None:
        """Sends the flows the datapath reports to the controller, in
        batches, on the Sync stream, while it is up. Never blocks the stream
        or the pump: when the stream is behind, batches are dropped and the
        loss counted (and told to the controller in the next batch)."""
        from dataplane.v1 import flow_pb2

        batch: list = []
        lost_unsent = 0
        last = time.monotonic()

        def flush():
            nonlocal batch, lost_unsent, last
            last = time.monotonic()
            if not batch and not lost_unsent:
                return
            if outq.qsize() >= UPLOAD_BACKLOG:
                self.upload_lost += len(batch)
                lost_unsent += len(batch)
            else:
                outq.put(pb.AgentMessage(flows=flow_pb2.FlowBatch(flows=[r.to_pb() for r in batch],
                                                                    lost=lost_unsent)))
                lost_unsent = 0
            batch = []

        for item in self.telemetry.hub.stream(lambda r: True, follow=True, active=uploading.is_set,
                                              wait_s=UPLOAD_INTERVAL_S, idle=True, internal=True):
            if item is None:                 # idle tick
                flush()
                continue
            if isinstance(item, int):        # this uploader itself fell behind the hub
                self.upload_lost += item
                lost_unsent += item
                continue
            batch.append(item)
            if len(batch) >= UPLOAD_BATCH or time.monotonic() - last >= UPLOAD_INTERVAL_S:
                flush()

    def run(self) -> None:
        backoff = BACKOFF_FIRST
        i = 0
        while not self._stop.is_set():
            address = self.opts.controllers[i % len(self.opts.controllers)]
            self.connected_once = False
            try:
                self.session(address)
                self.last_error = "stream ended"
            except grpc.RpcError as e:
                self.last_error = f"{address}: {e.code().name}: {e.details()}"
                if e.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                                grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    log.error("refused by %s: %s", address, self.last_error)
                else:
                    log.warning("controller %s: %s; enforcing the last state", address, self.last_error)
            except DataplaneError as e:
                self.last_error = str(e)
                # A delta that did not fit: the next stream starts with the digest of
                # what the maps hold, and the controller answers in_sync or a snapshot.
                log.warning("%s", e)
            if self.connected_once:
                backoff = BACKOFF_FIRST       # it was connected: the next outage starts from scratch
            i += 1
            if self._stop.wait(backoff):
                break
            backoff = min(BACKOFF_MAX, backoff * 2)

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self.telemetry is not None:
            self.telemetry.stop()

    def status(self) -> dict:
        return {"host": self.opts.host, "mode": "fleet", "revision": self.view.revision if self.view else 0,
                "digest": self.view.digest() if self.view else "", "controller": self.connected_to,
                "connected": bool(self.connected_to), "entries": len(self.view.entries) if self.view else 0,
                "prefixes": len(self.view.ipcache) if self.view else 0, "applied_at": self.applied_at,
                "last_error": self.last_error}
