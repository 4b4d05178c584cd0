"""Why would this flow pass or not? Answered from the compiled map entries,
with the same decision procedure as the datapath (loader.model), at every
enforcement point the flow crosses: egress at the source's host, ingress at
the destination's host. A flow passes only if every point lets it.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from dataplane.compiler import RESERVED_LABELS, CompiledState, Compiler
from dataplane.identity import render
from dataplane.policy import PortRange
from loader.abi import Direction, Reason, Verdict
from loader.errors import DataplaneError
from loader.model import Model


@dataclasses.dataclass
class Judgement:
    host: str
    direction: str
    verdict: str
    reason: str
    rule: str                   # rule name, or "default" (no rule matched)
    rule_id: int
    local: dict                 # {"identity": n, "labels": "..."}
    remote: dict


@dataclasses.dataclass
class Explanation:
    source: str
    destination: str
    src_addr: str
    dst_addr: str
    service: str
    verdict: str                # allow | deny | audit | unenforced
    judgements: list

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Explainer:
    def __init__(self, compiler: Compiler):
        self.compiler = compiler
        self.inventory = compiler.inventory
        self._states: dict[str, tuple[CompiledState, Model]] = {}

    def state(self, host: str) -> tuple[CompiledState, Model]:
        if host not in self._states:
            st = self.compiler.compile(host)
            self._states[host] = (st, Model.from_entries(st.identities, st.entries, st.audit_default))
        return self._states[host]

    def resolve(self, ref: str, family: int | None = None):
        """An address, or workload:NAME / user:NAME / host:NAME -> (address, host or None)."""
        inv = self.inventory
        kind, _, name = ref.partition(":") if ":" in ref and ref.split(":", 1)[0] in ("workload", "user", "host") \
            else ("address", "", ref)
        if kind == "address":
            try:
                addr = ipaddress.ip_address(ref)
            except ValueError:
                raise DataplaneError(f"{ref!r} is not an address, workload:NAME, user:NAME or host:NAME") from None
            return addr, self.host_of(addr)
        if kind == "workload":
            ep = inv.endpoint(name)
            if ep is None:
                raise DataplaneError(f"no endpoint named {name!r} in the inventory")
            return self._pick(ep.addresses, family, ref), ep.host
        if kind == "host":
            h = inv.host(name)
            if h is None or not h.addresses:
                raise DataplaneError(f"no host named {name!r} with an address in the inventory")
            return self._pick(h.addresses, family, ref), h.name
        live = [s for s in inv.sessions_of(name) if s.live_at(self.compiler.now)]
        if not live:
            raise DataplaneError(f"user {name!r} has no live session in the inventory")
        return self._pick(live[0].addresses, family, ref), None

    @staticmethod
    def _pick(addresses, family, ref):
        fitting = [a for a in addresses if family is None or a.version == family]
        if not fitting:
            raise DataplaneError(f"{ref} has no IPv{family} address")
        return fitting[0]

    def host_of(self, addr) -> str | None:
        for ep in self.inventory.endpoints:
            if addr in ep.addresses:
                return ep.host
        for h in self.inventory.hosts:
            if addr in h.addresses:
                return h.name
        return None

    def explain(self, source: str, destination: str, proto: int, port: int) -> Explanation:
        src, src_host = self.resolve(source)
        dst, dst_host = self.resolve(destination, src.version)
        if src.version != dst.version:
            raise DataplaneError(f"{source} is IPv{src.version} and {destination} is IPv{dst.version}")
        points = []
        if src_host is not None:
            points.append((src_host, Direction.EGRESS))
        if dst_host is not None:
            points.append((dst_host, Direction.INGRESS))
        judgements = []
        for host, direction in points:
            st, model = self.state(host)
            d = model.judge(src, dst, proto, port, direction)
            names = st.rule_names()
            judgements.append(Judgement(
                host=host, direction=direction.name.lower(), verdict=d.verdict.name.lower(),
                reason=Reason(d.reason).label, rule=names.get(d.rule_id, "default") if d.rule_id else "default",
                rule_id=d.rule_id, local=self._identity(st, d.local_id), remote=self._identity(st, d.remote_id)))
        if not judgements:
            overall = "unenforced"
        else:
            overall = max((Verdict[j.verdict.upper()] for j in judgements)).name.lower()
        service = PortRange(proto, port or 0, port or 65535).text() if proto else "any"
        return Explanation(source, destination, str(src), str(dst), service, overall, judgements)

    @staticmethod
    def _identity(st: CompiledState, n: int) -> dict:
        labels = RESERVED_LABELS.get(n) if n not in st.labels else render(st.labels[n])
        return {"identity": n, "labels": labels or RESERVED_LABELS.get(n, "")}
