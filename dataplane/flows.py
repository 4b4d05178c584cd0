"""Flow records: the datapath's verdict events, named and filtered.

The datapath reports every drop and every audit (and allowed new flows when
sampling is on) to its ring buffer. On each host the agent's EventPump reads
the ring in a thread of its own, names each event with the state in force
(Names: identity labels, rule names) and publishes it to a FlowHub:

- a bounded history (the last `history` flows), which `number` and `since`
  requests read;
- one bounded queue per following client. A client that reads more slowly
  than flows come loses the oldest ones it has not read, is told how many
  (GetFlowsResponse.lost), and never holds up the pump or other clients.

Nothing here can block the datapath: when the agent falls behind, the ring
fills, the kernel drops new events and counts them (events lost).

Filters are FIELD=VALUE expressions (see FIELDS), all of which must hold;
a value may list alternatives separated by commas.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import ipaddress
import re
import threading
import time

from loader import abi

RESERVED_LABELS = {abi.ReservedIdentity.HOST: {"reserved": "host"},
                   abi.ReservedIdentity.WORLD: {"reserved": "world"},
                   abi.ReservedIdentity.CONTROLLER: {"reserved": "controller"}}
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
PROTOCOL_NUMBERS = {v: k for k, v in PROTOCOLS.items()}
VERDICTS = {abi.Verdict.ALLOW: "allow", abi.Verdict.AUDIT: "audit", abi.Verdict.DENY: "deny"}


def reason_name(reason) -> str:
    """pass_policy -> policy, drop_revoked -> revoked (the verdict tells pass from drop)."""
    try:
        name = abi.Reason(int(reason)).name.lower()
    except ValueError:
        return f"reason-{int(reason)}"
    return name.split("_", 1)[1] if name.startswith(("pass_", "drop_")) else name


REASON_NAMES = {reason_name(r) for r in abi.Reason}


def parse_labels(rendered) -> dict:
    """Labels from dataplane.identity.render() text ("app=web env=prod"), or a dict as is."""
    if isinstance(rendered, dict):
        return dict(rendered)
    out = {}
    for part in (rendered or "").split():
        k, _, v = part.partition("=")
        out[k] = v
    return out


@dataclasses.dataclass(frozen=True)
class Names:
    """What the state in force calls identities and rules."""

    host: str = ""
    revision: int = 0
    audit_default: bool = False
    rules: dict = dataclasses.field(default_factory=dict)      # rule id -> name
    actions: dict = dataclasses.field(default_factory=dict)    # rule id -> allow | deny | audit
    labels: dict = dataclasses.field(default_factory=dict)     # identity -> {label: value}

    @classmethod
    def build(cls, host: str, revision: int, audit_default: bool, rule_names: dict, identity_labels: dict,
              entries) -> "Names":
        actions: dict[int, int] = {}
        for e in entries:
            actions[e.rule_id] = max(actions.get(e.rule_id, 0), int(e.action))
        return cls(host=host, revision=revision, audit_default=audit_default,
                   rules={int(k): v for k, v in rule_names.items()},
                   actions={k: VERDICTS.get(abi.Verdict(v), "") for k, v in actions.items()},
                   labels={int(k): parse_labels(v) for k, v in identity_labels.items()})

    @classmethod
    def from_record(cls, record: dict, host: str, revision: int = 0) -> "Names":
        """From the workspace's applied.json (dataplane.agent.Workspace)."""
        return cls(host=host, revision=record.get("revision", revision), audit_default=record.get("mode") == "audit",
                   rules={int(k): v for k, v in record.get("rules", {}).items()},
                   actions={int(k): v for k, v in record.get("actions", {}).items()},
                   labels={int(k): parse_labels(v) for k, v in record.get("identities", {}).items()})

    def actions_record(self) -> dict:
        return {str(k): v for k, v in sorted(self.actions.items())}

    def rule(self, rule_id: int) -> str:
        if rule_id == 0:
            return "default"
        return self.rules.get(rule_id, f"rule-{rule_id}")

    def action(self, rule_id: int) -> str:
        """The rule's action on this host: what its counters count."""
        if rule_id == 0:
            return "audit" if self.audit_default else "deny"
        return self.actions.get(rule_id, "")

    def identity(self, number: int) -> dict:
        return RESERVED_LABELS.get(number) or self.labels.get(number, {})


@dataclasses.dataclass(slots=True)
class FlowRecord:
    time_ns: int                 # Unix time, ns
    host: str
    src: object                  # ipaddress address, or None (not IP)
    dst: object
    sport: int
    dport: int
    proto: int
    src_id: int
    dst_id: int
    src_labels: dict
    dst_labels: dict
    direction: str
    verdict: str
    rule: str
    rule_id: int
    reason: str
    hook: str
    ifindex: int
    length: int

    @classmethod
    def from_event(cls, ev, names: Names, mono_to_unix_ns: int) -> "FlowRecord":
        # local_id is the host-local end of the flow. A packet met at an
        # ingress hook is going to it; at the egress hook it comes from it.
        from_local = ev.hook == abi.Hook.TC_EGRESS
        src_id, dst_id = (ev.local_id, ev.remote_id) if from_local else (ev.remote_id, ev.local_id)
        return cls(ev.ts_ns + mono_to_unix_ns, names.host, ev.src, ev.dst, ev.sport, ev.dport, ev.proto,
                   src_id, dst_id, names.identity(src_id), names.identity(dst_id),
                   ev.direction.name.lower(), VERDICTS.get(ev.verdict, "deny"), names.rule(ev.rule_id),
                   ev.rule_id, reason_name(ev.reason), ev.hook.name.lower(), ev.ifindex, ev.pkt_len)

    @classmethod
    def from_pb(cls, f, host: str | None = None) -> "FlowRecord":
        def addr(s):
            try:
                return ipaddress.ip_address(s)
            except ValueError:
                return None
        proto = PROTOCOL_NUMBERS.get(f.protocol)
        if proto is None:
            proto = int(f.protocol) if _digits(f.protocol) and int(f.protocol) < 256 else 0
        return cls(f.time_unix_ns, host if host is not None else f.host, addr(f.source), addr(f.destination),
                   f.source_port, f.destination_port, proto, f.source_identity.id, f.destination_identity.id,
                   dict(f.source_identity.labels), dict(f.destination_identity.labels), f.direction, f.verdict,
                   f.rule, f.rule_id, f.reason, f.hook, f.ifindex, f.length)

    def to_pb(self):
        from dataplane.v1 import flow_pb2

        return flow_pb2.Flow(
            time_unix_ns=self.time_ns, host=self.host, source=str(self.src) if self.src else "",
            destination=str(self.dst) if self.dst else "", source_port=self.sport, destination_port=self.dport,
            protocol=PROTOCOLS.get(self.proto, str(self.proto)),
            source_identity=flow_pb2.FlowIdentity(id=self.src_id, labels=self.src_labels),
            destination_identity=flow_pb2.FlowIdentity(id=self.dst_id, labels=self.dst_labels),
            direction=self.direction, verdict=self.verdict, rule=self.rule, rule_id=self.rule_id,
            reason=self.reason, hook=self.hook, ifindex=self.ifindex, length=self.length)


# --- filters ----------------------------------------------------------------------

class FilterError(ValueError):
    """A filter that cannot be used: unknown field or bad value (one line)."""


def _one_of(field, allowed):
    def parse(values):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise FilterError(f"{field}={bad[0]!r}: not one of {', '.join(sorted(allowed))}")
        return set(values)
    return parse


def _networks(field):
    def parse(values):
        out = []
        for v in values:
            try:
                out.append(ipaddress.ip_network(v, strict=False))
            except ValueError:
                raise FilterError(f"{field}={v!r}: not an address or prefix") from None
        return out
    return parse


def _digits(v: str) -> bool:
    return v.isascii() and v.isdigit()


def _ints(field, hi):
    def parse(values):
        out = set()
        for v in values:
            if not _digits(v) or int(v) > hi:
                raise FilterError(f"{field}={v!r}: not a number from 0 to {hi}")
            out.add(int(v))
        return out
    return parse


def _labels(field):
    """KEY, or KEY=V1[,V2...]: the label is present, or has one of the values."""
    def parse(values):
        out = []
        for v in values:
            k, eq, val = v.partition("=")
            if not k or not re.fullmatch(r"[A-Za-z0-9_.\-/]+", k):
                raise FilterError(f"{field}={v!r}: want KEY=VALUE or KEY")
            wanted = None
            if eq:
                wanted = {x.strip() for x in val.split(",") if x.strip()}
                if not wanted:
                    raise FilterError(f"{field}={v!r}: want KEY=VALUE or KEY")
            out.append((k, wanted))
        return out
    return parse


def _protocols(values):
    out = set()
    for v in values:
        if v in PROTOCOL_NUMBERS:
            out.add(PROTOCOL_NUMBERS[v])
        elif _digits(v) and int(v) < 256:
            out.add(int(v))
        else:
            raise FilterError(f"protocol={v!r}: not tcp, udp, icmp, icmpv6 or a number below 256")
    return out


def _has(labels: dict, wanted) -> bool:
    for k, values in wanted:
        if k not in labels:
            continue
        # A list-valued label (group=a,b) holds each of its values.
        if values is None or values & set(labels[k].split(",")):
            return True
    return False


def _in(addr, nets) -> bool:
    return addr is not None and any(addr.version == n.version and addr in n for n in nets)


# field -> (value parser, test(record, parsed))
FIELDS = {
    "verdict": (_one_of("verdict", {"allow", "deny", "audit"}), lambda r, s: r.verdict in s),
    "reason": (_one_of("reason", REASON_NAMES), lambda r, s: r.reason in s),
    "rule": (set, lambda r, s: r.rule in s),
    "direction": (_one_of("direction", {"ingress", "egress"}), lambda r, s: r.direction in s),
    "protocol": (_protocols, lambda r, s: r.proto in s),
    "host": (set, lambda r, s: r.host in s),
    "ip": (_networks("ip"), lambda r, n: _in(r.src, n) or _in(r.dst, n)),
    "source-ip": (_networks("source-ip"), lambda r, n: _in(r.src, n)),
    "destination-ip": (_networks("destination-ip"), lambda r, n: _in(r.dst, n)),
    "port": (_ints("port", 65535), lambda r, s: r.sport in s or r.dport in s),
    "source-port": (_ints("source-port", 65535), lambda r, s: r.sport in s),
    "destination-port": (_ints("destination-port", 65535), lambda r, s: r.dport in s),
    "label": (_labels("label"), lambda r, w: _has(r.src_labels, w) or _has(r.dst_labels, w)),
    "source-label": (_labels("source-label"), lambda r, w: _has(r.src_labels, w)),
    "destination-label": (_labels("destination-label"), lambda r, w: _has(r.dst_labels, w)),
    "identity": (_ints("identity", 2**32 - 1), lambda r, s: r.src_id in s or r.dst_id in s),
    "source-identity": (_ints("source-identity", 2**32 - 1), lambda r, s: r.src_id in s),
    "destination-identity": (_ints("destination-identity", 2**32 - 1), lambda r, s: r.dst_id in s),
}


def _split_values(text: str) -> list[str]:
    """Commas separate alternatives (label fields take one KEY=V1[,V2...])."""
    return [v.strip() for v in text.split(",") if v.strip()]


def compile_filters(exprs) -> "callable":
    """FIELD=VALUE expressions -> predicate(FlowRecord). FilterError on an
    unknown field or a bad value."""
    tests = []
    for expr in exprs:
        field, eq, value = expr.partition("=")
        field = field.strip()
        if field not in FIELDS:
            raise FilterError(f"unknown filter field {field!r} in {expr!r}; known: {', '.join(FIELDS)}")
        if not eq or not value.strip():
            raise FilterError(f"filter {expr!r}: want {field}=VALUE")
        parse, test = FIELDS[field]
        values = [value.strip()] if field.endswith("label") else _split_values(value)
        if not values:
            raise FilterError(f"filter {expr!r}: want {field}=VALUE")
        parsed = parse(values)
        tests.append((test, parsed))

    def match(record) -> bool:
        return all(test(record, parsed) for test, parsed in tests)
    return match


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$", re.ASCII)
_UNIT_NS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def parse_since(text: str, now_ns: int | None = None) -> int:
    """RFC 3339 time or a duration ago ("90s", "5m", "2h") -> Unix ns; "" -> 0."""
    text = (text or "").strip()
    if not text:
        return 0
    now_ns = time.time_ns() if now_ns is None else now_ns
    m = _DURATION.match(text)
    if m:
        from fractions import Fraction

        return now_ns - int(Fraction(m.group(1)) * _UNIT_NS[m.group(2)])
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise FilterError(f"since={text!r}: want an RFC 3339 time or a duration such as 90s, 5m, 2h") from None
    if t.tzinfo is None:
        raise FilterError(f"since={text!r}: give a time zone (Z or +HH:MM)")
    return (t - _EPOCH) // dt.timedelta(microseconds=1) * 1000


# --- the hub ----------------------------------------------------------------------

class _Subscriber:
    __slots__ = ("match", "queue", "maxlen", "lost", "cond", "internal")

    def __init__(self, match, maxlen: int, internal: bool = False):
        self.internal = internal      # the agent's own uploader: not a client in the counts
        self.match = match
        self.queue: collections.deque = collections.deque()
        self.maxlen = maxlen
        self.lost = 0                 # not yet reported to the client
        self.cond = threading.Condition()


class FlowHub:
    """Bounded history plus bounded per-client queues; see the module doc."""

    def __init__(self, history: int = 8192, client_queue: int = 4096):
        self._lock = threading.Lock()
        self._history: collections.deque = collections.deque(maxlen=history)
        self._subs: set[_Subscriber] = set()
        self.client_queue = client_queue
        self.published = 0
        self.client_lost = 0          # flows dropped for slow clients, all clients together

    def publish(self, record: FlowRecord) -> None:
        with self._lock:
            self._history.append(record)
            self.published += 1
            subs = list(self._subs)
        for sub in subs:
            if not sub.match(record):
                continue
            with sub.cond:
                if len(sub.queue) >= sub.maxlen:
                    sub.queue.popleft()
                    sub.lost += 1
                    if not sub.internal:
                        self.client_lost += 1
                sub.queue.append(record)
                sub.cond.notify()

    def publish_many(self, records) -> None:
        for r in records:
            self.publish(r)

    @property
    def clients(self) -> int:
        """Following clients (the agent's own uploader is not one)."""
        with self._lock:
            return sum(1 for s in self._subs if not s.internal)

    def __len__(self) -> int:
        return len(self._history)

    def stream(self, match, number: int = 0, since_ns: int = 0, follow: bool = False, active=lambda: True,
               wait_s: float = 0.5, client_queue: int | None = None, idle: bool = False, internal: bool = False):
        """Yields FlowRecords kept (the last `number` matching, since
        since_ns), then, with follow, new ones until active() is false or
        the generator is closed; an int n means n flows were lost; with
        idle, None each time wait_s passes without a flow."""
        sub = None
        with self._lock:
            past = [r for r in self._history if r.time_ns >= since_ns and match(r)]
            if follow:
                sub = _Subscriber(lambda r: r.time_ns >= since_ns and match(r), client_queue or self.client_queue,
                                  internal)
                self._subs.add(sub)
        if number:
            past = past[-number:]
        try:
            yield from past
            while sub is not None and active():
                with sub.cond:
                    if not sub.queue and not sub.lost:
                        sub.cond.wait(wait_s)
                    items = list(sub.queue)
                    sub.queue.clear()
                    lost, sub.lost = sub.lost, 0
                if lost:
                    yield lost
                if idle and not items and not lost:
                    yield None
                yield from items
        finally:
            if sub is not None:
                with self._lock:
                    self._subs.discard(sub)


def stream_flows(hub: FlowHub, request, context):
    """Validates a GetFlowsRequest (FilterError) and returns the response
    generator; shared by the agent's and the controller's GetFlows."""
    from dataplane.v1 import flow_pb2

    match = compile_filters(request.filter)
    since = parse_since(request.since)

    def gen():
        for item in hub.stream(match, number=request.number, since_ns=since, follow=request.follow,
                               active=context.is_active):
            if isinstance(item, int):
                yield flow_pb2.GetFlowsResponse(lost=item)
            else:
                yield flow_pb2.GetFlowsResponse(flow=item.to_pb())
    return gen()


# --- the pump ----------------------------------------------------------------------

def mono_to_unix_offset_ns() -> int:
    """Add to a CLOCK_MONOTONIC time (bpf_ktime_get_ns) to get Unix time."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class EventPump:
    """Reads the datapath's event ring in a thread and publishes named flows."""

    def __init__(self, dp, hub: FlowHub, names_fn, poll_ms: int = 200):
        self.dp = dp
        self.hub = hub
        self.names_fn = names_fn
        self.poll_ms = poll_ms
        self.received = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._offset = mono_to_unix_offset_ns()

    def _on_event(self, ev) -> None:
        self.received += 1
        # names_fn() at each event: a flow is named by the state in force when it is read.
        self.hub.publish(FlowRecord.from_event(ev, self.names_fn(), self._offset))

    def start(self) -> "EventPump":
        from loader.events import EventReader

        self._reader = EventReader(self.dp.maps["events"].fd, self._on_event)
        self._thread = threading.Thread(target=self._run, name="event-pump", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import logging

        log = logging.getLogger("dataplane.flows")
        while not self._stop.is_set():
            self._offset = mono_to_unix_offset_ns()
            try:
                self._reader.poll(self.poll_ms)
            except Exception as e:  # a bad record must not stop the pump
                self.errors += 1
                log.warning("flow event not decoded: %s", e)
        self._reader.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
