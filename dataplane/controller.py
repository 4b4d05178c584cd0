"""The controller: holds the policy revisions, the inventory, the user
sessions and the numbering; compiles each host's state and streams it to
that host's agent; revokes sessions so that their connections are cut on
every host.

    dataplane controller --listen 0.0.0.0:7443 --tls-dir /etc/dataplane/pki \\
        [--store sqlite:///var/lib/dataplane/controller.db | etcd://h1:2379,h2:2379]

With etcd, several controllers run together: one leads (holds a leased key)
and alone accepts writes; every controller serves agents and reads, and
followers learn the leader's commits through an etcd watch. If etcd goes
away, writes stop (UNAVAILABLE) and agents keep enforcing what they have.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import queue
import threading
import time
from concurrent import futures

import grpc

from dataplane import certs
from dataplane.flows import FilterError, FlowHub, FlowRecord, stream_flows
from dataplane.fleet import HostView, State, session_from_record, utcnow
from dataplane.inventory import parse_inventory
from dataplane.policy import parse_policy
from dataplane.source import SourceError, loads
from dataplane.store import Store, StoreError
from dataplane.v1 import controller_pb2 as pb
from dataplane.v1 import controller_pb2_grpc as pb_grpc
from loader.errors import DataplaneError

log = logging.getLogger("dataplane.controller")

MAX_FLOW_FOLLOWERS = 16     # GetFlows streams with follow at once (each holds a server thread)
EMPTY_REGISTRATION = {"interfaces": [], "addresses": [], "endpoints": []}
STATUS_FLUSH_S = 0.1        # agent status records are written in batches this often
HEARTBEAT_S = 5             # connected agents' status is refreshed this often
STALE_S = 3 * HEARTBEAT_S   # a status older than this is not believed connected


class Refused(Exception):
    """An RPC refused with a status code and a one-line reason."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _abort(context, code, message):
    context.abort(code, message)


def require(role: str):
    """Decorator: the caller's client certificate must carry this role."""

    def wrap(fn):
        def handler(self, request, context):
            who = self.caller(context)
            if who is not None and who[0] != role:
                _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                       f"{fn.__name__} needs an {role} certificate; this one is {who[0] or 'unknown'} {who[1]!r}")
            try:
                return fn(self, request, context)
            except Refused as e:
                _abort(context, e.code, str(e))
            except SourceError as e:
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "; ".join(e.problems))
            except StoreError as e:
                _abort(context, grpc.StatusCode.UNAVAILABLE, f"store: {e}")
            except DataplaneError as e:
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        handler.__name__ = fn.__name__
        handler.__doc__ = fn.__doc__
        return handler
    return wrap


@dataclasses.dataclass
class Stream:
    host: str
    queue: "queue.Queue"
    view: HostView | None = None          # what this stream last sent
    applied_revision: int = 0
    applied_digest: str = ""
    error: str = ""
    apply_ms: float = 0.0
    connected_at: float = 0.0


class ControllerCore:
    """State, numbering, compiling and fan-out; the gRPC servicers are thin."""

    def __init__(self, store: Store, name: str):
        self.store = store
        self.name = name
        self._lock = threading.RLock()
        self.leader = False
        self.state = State()
        self._views: dict[str, HostView] = {}       # host -> view of the current state and time
        self._views_fingerprint = ""
        self._compiler = None
        self._streams: dict[int, Stream] = {}
        self._next_wakeup: dt.datetime | None = None
        self._stop = threading.Event()
        self._status_pending: dict[str, str] = {}
        self._status_cond = threading.Condition()
        self.flows = FlowHub(history=16384)     # flows from the agents connected here
        self.flows_agent_lost = 0
        self.reload()

    # -- state ------------------------------------------------------------------

    def reload(self) -> None:
        rows, revision = self.store.load()
        with self._lock:
            if revision == self.state.revision and self.state.revision:
                return
            self.state = State.from_rows(rows)
            self._forget_views()
        log.info("state revision %d (policy revision %d)", self.state.revision, self.state.active_policy)
        self.push_all()

    def set_leader(self, leader: bool) -> None:
        self.leader = leader
        if leader:
            self.reload()

    def commit(self, change) -> State:
        """change(state) -> (puts, deletes) on a copy; numbers for any new
        label set or rule are added, then one compare-and-swap commit."""
        if not self.leader:
            try:
                leader = self.store.leader()
            except StoreError as e:
                raise Refused(grpc.StatusCode.UNAVAILABLE,
                              f"the store is unreachable, writes are refused until it is back ({e})") from None
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          f"this controller ({self.name}) is not the leader"
                          + (f"; the leader is {leader}: retry there" if leader else "; none is elected yet"))
        for _ in range(3):
            with self._lock:
                base = self.state
                work = State.from_rows(self._rows(base))
                puts, deletes = change(work)
                work = State.from_rows({**{k: v for k, v in self._rows(base).items() if k not in deletes},
                                        **puts})
                # Validate by compiling, and hand out numbers for what is new.
                compiler = work.compiler(allocate=True)
                for key, n in compiler.ids.numbers.items():
                    if work.identities.get(key) != n:
                        puts[f"identity/{n}"] = key
                for name, n in compiler.rules.numbers.items():
                    if work.rules.get(name) != n:
                        puts[f"rule/{name}"] = str(n)
                puts["meta"] = json.dumps({"revision": base.revision + 1,
                                           "active_policy": work.active_policy})
                if self.store.commit(base.revision, base.revision + 1, puts, deletes):
                    break
            self.reload()
        else:
            raise Refused(grpc.StatusCode.ABORTED, "the state kept changing under this write; retry")
        self.reload()
        return self.state

    @staticmethod
    def _rows(s: State) -> dict:
        rows = {"meta": json.dumps({"revision": s.revision, "active_policy": s.active_policy}),
                "inventory": json.dumps({"text": s.inventory_text})}
        rows.update({f"policy/{n}": json.dumps(r) for n, r in s.policies.items()})
        rows.update({f"agent/{h}": json.dumps(r) for h, r in s.agents.items()})
        rows.update({f"session/{i}": json.dumps(r) for i, r in s.sessions.items()})
        rows.update({f"identity/{n}": k for k, n in s.identities.items()})
        rows.update({f"rule/{k}": str(n) for k, n in s.rules.items()})
        return rows

    # -- compiled views ------------------------------------------------------------

    def _forget_views(self, force: bool = False) -> None:
        """After a state change: compiled views are dropped unless the change
        cannot alter them (same compile inputs); kept views are relabelled
        with the new revision as they are asked for. force: time passed a
        validity window or a session's end."""
        with self._lock:
            fingerprint = self.state.compile_inputs()
            if not force and fingerprint == self._views_fingerprint:
                return
            self._views.clear()
            self._compiler = None
            self._views_fingerprint = fingerprint

    def view(self, host: str) -> HostView:
        """The host's compiled state now; one compiler serves every host
        until the state changes or a validity window passes."""
        with self._lock:
            cached = self._views.get(host)
            if cached is not None:
                if cached.revision != self.state.revision:
                    digest = cached.digest()
                    cached = self._views[host] = dataclasses.replace(cached, revision=self.state.revision)
                    cached.__dict__["_digest"] = digest
                return cached
            state = self.state
            if self._compiler is None:
                self._compiler = state.compiler(utcnow())
            compiler = self._compiler
        st = compiler.compile(host)
        view = HostView.of(st, state.revision)
        with self._lock:
            if state is self.state:
                self._views[host] = view
            if st.next_change is not None and (self._next_wakeup is None or st.next_change < self._next_wakeup):
                self._next_wakeup = st.next_change
        return view

    def known_host(self, host: str) -> bool:
        """Hosts are declared in the inventory: a valid agent certificate
        alone does not add one."""
        return host in self.state.declared_hosts()

    # -- agent streams ------------------------------------------------------------

    def add_stream(self, stream: Stream) -> int:
        with self._lock:
            sid = id(stream)
            self._streams[sid] = stream
        return sid

    def drop_stream(self, sid: int) -> None:
        with self._lock:
            stream = self._streams.pop(sid, None)
        if stream:
            self.report(stream, connected=False)

    def push_all(self) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            s.queue.put("changed")

    def report(self, stream: Stream, connected: bool = True) -> None:
        """Agent status, for fleet status on any controller."""
        record = {"connected": connected, "applied_revision": stream.applied_revision,
                  "digest": stream.applied_digest, "controller": self.name, "error": stream.error,
                  "apply_ms": stream.apply_ms, "last_seen": utcnow().isoformat()}
        self.put_status(f"agent/{stream.host}", json.dumps(record))

    def put_status(self, key: str, value: str) -> None:
        """Status records are written in batches (STATUS_FLUSH_S): a fleet's
        acks after a change are one store transaction, not one each. The
        latest record of a key wins."""
        with self._status_cond:
            self._status_pending[key] = value
            self._status_cond.notify()

    def flush_status(self) -> None:
        with self._status_cond:
            items, self._status_pending = self._status_pending, {}
        if not items:
            return
        try:
            self.store.put_status_many(items)
        except StoreError as e:
            log.warning("cannot record the status of %d agent(s): %s", len(items), e)

    def _status_writer(self) -> None:
        while not self._stop.is_set():
            with self._status_cond:
                if not self._status_pending:
                    self._status_cond.wait(1.0)
            if self._stop.wait(STATUS_FLUSH_S):
                break
            self.flush_status()
        self.flush_status()

    def commit_registrations(self) -> None:
        """Leader: commits registrations filed by any controller that differ
        from the state (declared hosts only)."""
        try:
            pending = {k.partition("/")[2]: json.loads(v) for k, v in self.store.load_status().items()
                       if k.startswith("registration/")}
        except StoreError:
            return
        declared = self.state.declared_hosts()
        changed = {h: r for h, r in pending.items() if h in declared and self.state.agents.get(h) != r}
        if not changed:
            return
        try:
            self.commit(lambda s: ({f"agent/{h}": json.dumps(r) for h, r in changed.items()}, []))
            log.info("registered %s", ", ".join(sorted(changed)))
        except (Refused, DataplaneError) as e:
            log.warning("registrations not recorded: %s", e)

    def connected_hosts(self) -> set[str]:
        with self._lock:
            return {s.host for s in self._streams.values()}

    def stream_statuses(self) -> dict[str, int]:
        """host -> revision applied, for the agents connected here."""
        with self._lock:
            return {s.host: s.applied_revision for s in self._streams.values()}

    def active_sessions(self) -> int:
        now = utcnow()
        n = 0
        for r in list(self.state.sessions.values()):
            exp = r.get("expires")
            if not exp or dt.datetime.fromisoformat(exp) > now:
                n += 1
        return n

    def flow_counts(self) -> dict:
        return {"received": self.flows.published, "client_lost": self.flows.client_lost,
                "agent_lost": self.flows_agent_lost}

    def ingest_flows(self, host: str, batch) -> None:
        """Flows an agent sent; the host is the stream's (authenticated), not the records'."""
        self.flows_agent_lost += batch.lost
        for f in batch.flows:
            self.flows.publish(FlowRecord.from_pb(f, host=host))

    def timers(self) -> None:
        """Re-sends states when a validity window opens or closes, and
        refreshes the status of connected agents (a heartbeat: records not
        refreshed for a while mean the controller holding them is gone)."""
        beat = 0
        while not self._stop.wait(0.5):
            beat += 1
            if self.leader and beat % 2 == 0:
                self.commit_registrations()
            if beat % (HEARTBEAT_S * 2) == 0:
                with self._lock:
                    streams = list(self._streams.values())
                for s in streams:
                    self.report(s)
            with self._lock:
                due = self._next_wakeup is not None and utcnow() >= self._next_wakeup
                if due:
                    self._next_wakeup = None
            if due:
                log.info("a validity window or session end passed: recompiling")
                self._forget_views(force=True)
                self.push_all()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            s.queue.put(None)
        with self._status_cond:
            self._status_cond.notify()


class AgentSyncServicer(pb_grpc.AgentSyncServicer):
    def __init__(self, core: ControllerCore, secure: bool):
        self.core = core
        self.secure = secure

    def caller(self, context):
        return _caller(context) if self.secure else None

    def Sync(self, request_iterator, context):
        core = self.core
        who = self.caller(context)
        if who is not None and who[0] != "agent":
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"Sync needs an agent certificate; this one is {who[0] or 'unknown'} {who[1]!r}")
        try:
            first = next(request_iterator)
        except StopIteration:
            return
        if first.WhichOneof("msg") != "hello":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a hello")
        hello = first.hello
        if who is not None and who[1] != hello.host:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"this certificate is for host {who[1]!r}, not {hello.host!r}")
        if hello.revision > core.state.revision:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"host {hello.host} enforces revision {hello.revision}, newer than this controller's "
                          f"{core.state.revision}: wrong controller or a lost store")
        if not core.known_host(hello.host):
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"unknown host {hello.host!r}: declare it in the inventory first")
        self._register(hello)

        stream = Stream(hello.host, queue.Queue(), applied_revision=hello.revision,
                        applied_digest=hello.digest, connected_at=time.monotonic())
        sid = core.add_stream(stream)
        context.add_callback(lambda: stream.queue.put(None))
        threading.Thread(target=self._read_acks, args=(request_iterator, stream), daemon=True).start()
        log.info("agent %s connected (revision %d)", hello.host, hello.revision)
        core.report(stream)
        try:
            view = core.view(hello.host)
            stream.view = view
            if hello.digest and hello.digest == view.digest():
                yield pb.ControllerMessage(in_sync=pb.InSync(revision=view.revision))
            else:
                yield pb.ControllerMessage(snapshot=view.to_msg())
            while True:
                item = stream.queue.get()
                if item is None:
                    break
                if item == "ack":
                    core.report(stream)
                    continue
                while not stream.queue.empty():   # coalesce bursts of changes
                    nxt = stream.queue.get_nowait()
                    if nxt is None:
                        return
                new = core.view(hello.host)
                if new.digest() == stream.view.digest() and new.revision == stream.view.revision:
                    continue
                yield pb.ControllerMessage(delta=stream.view.delta_to(new))
                stream.view = new
        finally:
            core.drop_stream(sid)
            log.info("agent %s disconnected", hello.host)

    def _read_acks(self, request_iterator, stream: Stream) -> None:
        try:
            for msg in request_iterator:
                kind = msg.WhichOneof("msg")
                if kind == "applied":
                    a = msg.applied
                    stream.applied_revision, stream.applied_digest = a.revision, a.digest
                    stream.error, stream.apply_ms = a.error, a.apply_ms
                    stream.queue.put("ack")
                elif kind == "flows":
                    self.core.ingest_flows(stream.host, msg.flows)
        except grpc.RpcError:
            pass
        finally:
            stream.queue.put(None)

    def _register(self, hello) -> None:
        """Records the host's interfaces, addresses and endpoints. Any
        controller files it as pending (a plain write); the leader commits
        pending registrations into the state (at once when it is the one the
        agent talks to, otherwise within a second)."""
        core = self.core
        record = {"interfaces": sorted(hello.interfaces), "addresses": sorted(hello.addresses),
                  "endpoints": sorted(({"name": e.name, "addresses": list(e.addresses), "labels": dict(e.labels)}
                                       for e in hello.endpoints), key=lambda e: e["name"])}
        if core.state.agents.get(hello.host, EMPTY_REGISTRATION) == record:
            return
        try:
            core.store.put_status(f"registration/{hello.host}", json.dumps(record))
        except StoreError as e:
            log.warning("registration of %s not filed: %s", hello.host, e)
        if core.leader:
            # Before the first state is sent, so the agent starts from a
            # state that has its registration in it.
            core.commit_registrations()


class ControllerServicer(pb_grpc.ControllerServicer):
    def __init__(self, core: ControllerCore, secure: bool):
        self.core = core
        self.secure = secure

    def caller(self, context):
        return _caller(context) if self.secure else None

    # -- policy ------------------------------------------------------------------

    def _revision_msg(self, number: int, s: State) -> pb.PolicyRevision:
        r = s.policies[number]
        return pb.PolicyRevision(number=number, created_at=r["created_at"], text=r["text"], digest=r["digest"],
                                 rules=r["rules"], active=number == s.active_policy, comment=r.get("comment", ""))

    def _new_policy(self, text: str, comment: str, expected: int = 0):
        data, where = loads(text, "policy")
        policy = parse_policy(data, where)
        warnings: list[str] = []

        def change(s: State):
            if expected and s.active_policy != expected:
                raise Refused(grpc.StatusCode.ABORTED,
                              f"stale revision: policy revision {s.active_policy} is active, not {expected}")
            number = max(s.policies, default=0) + 1
            record = {"text": text, "created_at": utcnow().isoformat(), "comment": comment,
                      "digest": hashlib.sha256(text.encode()).hexdigest()[:16], "rules": len(policy.rules)}
            s.active_policy = number
            return {f"policy/{number}": json.dumps(record),
                    "meta": json.dumps({"revision": s.revision, "active_policy": number})}, []
        state = self.core.commit(change)
        # Warnings (a rule matching nothing, an address claimed twice) come
        # from the identities every host shares: one host's compile has them all.
        compiler = state.compiler()
        first = compiler.inventory.hosts[0].name if compiler.inventory.hosts else ""
        warnings += compiler.compile(first).warnings
        return pb.ApplyPolicyResponse(revision=self._revision_msg(state.active_policy, state),
                                      state_revision=state.revision, warnings=warnings)

    @require("admin")
    def ApplyPolicy(self, request, context):
        """A new policy revision, active at once (refused whole if it does not parse)."""
        return self._new_policy(request.text, request.comment, request.expected_revision)

    @require("admin")
    def GetPolicy(self, request, context):
        s = self.core.state
        number = request.number or s.active_policy
        if number not in s.policies:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no policy revision {number}")
        return self._revision_msg(number, s)

    @require("admin")
    def ListPolicies(self, request, context):
        s = self.core.state
        return pb.ListPoliciesResponse(revisions=[self._revision_msg(n, s) for n in sorted(s.policies)])

    @require("admin")
    def RollbackPolicy(self, request, context):
        s = self.core.state
        if request.number not in s.policies:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no policy revision {request.number}")
        return self._new_policy(s.policies[request.number]["text"], f"rollback to revision {request.number}")

    # -- inventory ------------------------------------------------------------------

    @require("admin")
    def ApplyInventory(self, request, context):
        data, where = loads(request.text, "inventory")
        inventory = parse_inventory(data, where)
        if inventory.sessions:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          "inventory: sessions are opened with OpenSession, not in the inventory")
        state = self.core.commit(lambda s: ({"inventory": json.dumps({"text": request.text})}, []))
        return pb.ApplyInventoryResponse(state_revision=state.revision)

    @require("admin")
    def ListEndpoints(self, request, context):
        s = self.core.state
        inv = s.inventory()
        declared = {e.name for e in parse_inventory(*loads(s.inventory_text, "inventory")).endpoints}
        return pb.ListEndpointsResponse(endpoints=[
            pb.EndpointInfo(name=e.name, host=e.host, addresses=[str(a) for a in e.addresses],
                            labels={k: (",".join(sorted(v)) if isinstance(v, frozenset) else v)
                                    for k, v in e.labels.items()},
                            source="inventory" if e.name in declared else "agent")
            for e in inv.endpoints])

    # -- sessions ---------------------------------------------------------------------

    @staticmethod
    def _session_msg(r: dict) -> pb.Session:
        return pb.Session(id=r["id"], user=r["user"], groups=r.get("groups", []), device=r.get("device", {}),
                          addresses=r["addresses"], expires=r.get("expires", ""), opened_at=r.get("opened_at", ""),
                          host=r.get("host", ""))

    @require("admin")
    def OpenSession(self, request, context):
        m = request.session
        if not m.user:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a session needs a user")
        if not m.addresses:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a session needs the address its traffic comes from")
        record = {"id": m.id or f"{m.user}@{m.addresses[0]}", "user": m.user, "groups": sorted(m.groups),
                  "device": dict(m.device), "addresses": list(m.addresses), "expires": m.expires,
                  "opened_at": utcnow().isoformat(), "host": m.host}
        try:
            session_from_record(record)
        except ValueError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"session: {e}") from None

        def change(s: State):
            if m.host and m.host not in s.declared_hosts():
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"session host {m.host!r} is not in the inventory")
            for other in s.sessions.values():
                if other["id"] != record["id"] and set(other["addresses"]) & set(record["addresses"]):
                    raise Refused(grpc.StatusCode.ALREADY_EXISTS,
                                  f"address {sorted(set(other['addresses']) & set(record['addresses']))[0]} "
                                  f"already belongs to session {other['id']}")
            return {f"session/{record['id']}": json.dumps(record)}, []
        state = self.core.commit(change)
        return pb.SessionResponse(session=self._session_msg(record), state_revision=state.revision)

    @require("admin")
    def UpdatePosture(self, request, context):
        s = self.core.state
        if request.id not in s.sessions:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no session {request.id!r}")
        record = {**s.sessions[request.id], "device": dict(request.device)}
        state = self.core.commit(lambda st: ({f"session/{request.id}": json.dumps(record)}, []))
        return pb.SessionResponse(session=self._session_msg(record), state_revision=state.revision)

    @require("admin")
    def RevokeSession(self, request, context):
        s = self.core.state
        if request.id not in s.sessions:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no session {request.id!r}")
        record = s.sessions[request.id]
        state = self.core.commit(lambda st: ({}, [f"session/{request.id}"]))
        return pb.SessionResponse(session=self._session_msg(record), state_revision=state.revision)

    @require("admin")
    def ListSessions(self, request, context):
        return pb.ListSessionsResponse(sessions=[self._session_msg(r) for _, r in
                                                 sorted(self.core.state.sessions.items())])

    # -- flows ----------------------------------------------------------------------

    @require("admin")
    def GetFlows(self, request, context):
        if request.follow and self.core.flows.clients >= MAX_FLOW_FOLLOWERS:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{MAX_FLOW_FOLLOWERS} flow clients are following already; try again later")
        try:
            return stream_flows(self.core.flows, request, context)
        except FilterError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None

    # -- fleet ----------------------------------------------------------------------

    @require("admin")
    def FleetStatus(self, request, context):
        core = self.core
        s = core.state
        store_error = ""
        try:
            statuses = {k.partition("/")[2]: json.loads(v) for k, v in core.store.load_status().items()
                        if k.startswith("agent/")}
        except StoreError as e:
            statuses, store_error = {}, str(e)
        hosts = sorted(set(statuses) | {h.name for h in s.inventory().hosts})
        live_here = core.connected_hosts()
        now = utcnow()
        agents = []
        for h in hosts:
            st = statuses.get(h, {})
            applied = st.get("applied_revision", 0)
            # Believe "connected" from this controller only for its live streams,
            # and from others only while their heartbeat is fresh.
            connected = h in live_here or (
                st.get("connected", False) and st.get("controller") != core.name and st.get("last_seen")
                and (now - dt.datetime.fromisoformat(st["last_seen"])).total_seconds() < STALE_S)
            agents.append(pb.AgentInfo(host=h, connected=bool(connected), applied_revision=applied,
                                       lag=max(0, s.revision - applied) if applied else s.revision,
                                       last_seen=st.get("last_seen", ""), controller=st.get("controller", ""),
                                       error=st.get("error", ""), apply_ms=st.get("apply_ms", 0.0)))
        return pb.FleetStatusResponse(revision=s.revision, policy_revision=s.active_policy, agents=agents,
                                      controller=core.name, leader=core.leader, store_error=store_error)


class LatencyInterceptor(grpc.ServerInterceptor):
    """Observes unary call durations into a histogram labelled method, code."""

    def __init__(self, histogram):
        self.histogram = histogram

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary
        hist = self.histogram

        def timed(request, context):
            t0 = time.perf_counter()
            code = "OK"
            try:
                return inner(request, context)
            except Exception:
                c = context.code() if hasattr(context, "code") else None
                code = c.name if c is not None else "UNKNOWN"
                raise
            finally:
                hist.labels(method, code).observe(time.perf_counter() - t0)

        return grpc.unary_unary_rpc_method_handler(timed, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


def _caller(context) -> tuple[str, str]:
    """(role, common name) from the client certificate of a mutual-TLS call."""
    auth = context.auth_context()
    pem = auth.get("x509_pem_cert")
    if not pem:
        return ("", "")
    return certs.peer_identity(pem[0])


def serve(core: ControllerCore, listen: str, tls: certs.Credentials | None, max_workers: int = 256,
          interceptors=()):
    """Starts the gRPC server (controller, agent sync, health, reflection)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=list(interceptors),
                         options=[("grpc.keepalive_time_ms", 10000), ("grpc.keepalive_timeout_ms", 5000),
                                  ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                                  ("grpc.keepalive_permit_without_calls", 1)])
    secure = tls is not None
    pb_grpc.add_ControllerServicer_to_server(ControllerServicer(core, secure), server)
    pb_grpc.add_AgentSyncServicer_to_server(AgentSyncServicer(core, secure), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [pb.DESCRIPTOR.services_by_name["Controller"].full_name,
             pb.DESCRIPTOR.services_by_name["AgentSync"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    for svc in ["", *names[:2]]:
        health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    if secure:
        creds = grpc.ssl_server_credentials(((tls.key, tls.cert),), root_certificates=tls.ca,
                                            require_client_auth=True)
        port = server.add_secure_port(listen, creds)
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise DataplaneError(f"cannot listen on {listen}")
    server.start()
    return server, port


def run(store: Store, name: str, listen: str, tls: certs.Credentials | None, ready=None,
        metrics: str | None = None, max_agents: int = 1024) -> None:
    from dataplane.metrics import ControllerCollector, MetricsServer, api_latency_histogram, new_registry

    core = ControllerCore(store, name)
    registry = new_registry()
    registry.register(ControllerCollector(core, core.flow_counts))
    interceptor = LatencyInterceptor(api_latency_histogram(registry))
    metrics_server = MetricsServer(registry, metrics) if metrics else None
    store.campaign(name, core.set_leader)
    store.watch(core.reload)
    threading.Thread(target=core.timers, daemon=True).start()
    writer = threading.Thread(target=core._status_writer, name="status-writer", daemon=True)
    writer.start()
    # Every agent's Sync stream holds a server thread, and so does every
    # following flow client: room for all of them plus the admin calls.
    server, port = serve(core, listen, tls, max_workers=max_agents + MAX_FLOW_FOLLOWERS + 64,
                         interceptors=[interceptor])
    log.info("controller %s listening on %s (%s, %s)", name, listen.rsplit(":", 1)[0] + f":{port}",
             store.name, "mutual TLS" if tls else "PLAINTEXT")
    if ready:
        ready(port)
    stop = threading.Event()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    core.stop()
    server.stop(grace=1).wait()
    writer.join(timeout=5)
    core.flush_status()          # what the streams' ends reported
    if metrics_server:
        metrics_server.stop()
    store.close()
