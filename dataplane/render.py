"""Turning map entries into plain rows (for tables and JSON) and printing them."""

from __future__ import annotations

import json
import time

from loader import abi

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}


def proto_name(p: int) -> str:
    return PROTO_NAMES.get(p, str(p)) if p else "any"


def _endpoint(family: int, raw_addr, port_be: int) -> str:
    ip = abi.addr_from_c(family, raw_addr)
    port = abi.ntohs(port_be)
    return f"[{ip}]:{port}" if family == abi.Family.IPV6 else f"{ip}:{port}"


def _monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def rows_for(attr: str, dp, limit: int | None = None) -> list[dict]:
    """Decoded entries of one map (by Datapath attribute name)."""
    from loader import tables

    m = dp.maps[attr]
    lpm = attr == "ipcache" and m.map_type == 11
    live = tables.active_generation(dp)
    rows: list[dict] = []

    def done():
        return limit is not None and len(rows) >= limit

    # Tables with two generations show the live one: what packets are judged by.
    if attr == "ipcache":
        for k, v in m.items():
            if k.gen != live:
                continue
            row = {"prefix": str(abi.ip_key_network(k, lpm)), "identity": v.identity}
            if v.expires_s:
                row["expires_in_s"] = v.expires_s - tables.monotonic_seconds()
            rows.append(row)
            if done():
                break
        rows.sort(key=lambda r: r["prefix"])
    elif attr == "plens":
        for k, v in m.items():
            if k.value // 2 != live:
                continue
            rows.append({"family": "ipv4" if k.value % 2 == 0 else "ipv6",
                         "prefix_lengths": [v.e[i].prefixlen for i in range(v.count)]})
    elif attr == "policy":
        for k, v in m.items():
            if k.gen != live:
                continue
            row = {"local": k.local_id, "remote": k.remote_id or "any",
                   "direction": abi.Direction(k.dir).name.lower(), "proto": proto_name(k.proto),
                   "port": k.dport or "any", "action": abi.Verdict(v.action).name.lower(),
                   "rule": v.rule_id}
            if v.ranges:
                rs = dp.maps["ranges"].lookup(v.ranges)
                row["ranges"] = [f"{rs.r[i].lo}-{rs.r[i].hi}:{abi.Verdict(rs.r[i].action).name.lower()}"
                                 f":{rs.r[i].rule_id}" for i in range(rs.count)]
            rows.append(row)
            if done():
                break
        rows.sort(key=lambda r: (r["local"], str(r["remote"]), r["direction"], r["proto"], str(r["port"])))
    elif attr == "ranges":
        for k, v in m.items():
            if v.count:
                rows.append({"index": k.value, "ranges": [
                    {"lo": v.r[i].lo, "hi": v.r[i].hi, "action": abi.Verdict(v.r[i].action).name.lower(),
                     "rule": v.r[i].rule_id} for i in range(v.count)]})
            if done():
                break
    elif attr == "ct":
        now = _monotonic_ns()
        for k, v in m.items():
            a, b = _endpoint(k.family, k.addr_a, k.port_a), _endpoint(k.family, k.addr_b, k.port_b)
            init, resp = (a, b) if v.flags & abi.CT_INIT_IS_A else (b, a)
            rows.append({"initiator": init, "responder": resp, "proto": proto_name(k.proto),
                         "direction": "egress" if v.flags & abi.CT_INIT_EGRESS else "ingress",
                         "verdict": abi.Verdict(v.verdict).name.lower(), "rule": v.rule_id,
                         "local": v.local_id, "remote": v.remote_id, "epoch": v.epoch,
                         "closing": bool(v.flags & abi.CT_CLOSING),
                         "idle_s": round(max(0, now - v.last_seen_ns) / 1e9, 1)})
            if done():
                break
    elif attr == "frag":
        for k, v in m.items():
            rows.append({"src": str(abi.addr_from_c(k.family, k.saddr)),
                         "dst": str(abi.addr_from_c(k.family, k.daddr)), "id": k.id,
                         "proto": proto_name(k.proto), "verdict": abi.Verdict(v.verdict).name.lower(),
                         "rule": v.rule_id})
            if done():
                break
    elif attr == "gen":
        rows.append({"live_generation": live})
    elif attr == "config":
        c = m.lookup(0)
        rows.append({"generation": live, "epoch": c.epoch, "audit_default": tables.live_audit_default(dp),
                     "allow_sample": c.allow_sample})
    elif attr == "rules":
        for (rule, direction), (pk, by) in sorted(dp.rule_counters_by_direction().items()):
            rows.append({"rule": rule, "direction": direction.name.lower(), "packets": pk, "bytes": by})
    elif attr == "reasons":
        for reason, (pk, by) in sorted(dp.reason_counters().items()):
            rows.append({"reason": getattr(reason, "name", str(reason)).lower(), "code": int(reason),
                         "verdict": "drop" if int(reason) >= abi.REASON_FIRST_DROP else "pass",
                         "packets": pk, "bytes": by})
    elif attr == "stats":
        for stat, value in dp.stat_counters().items():
            rows.append({"stat": stat.name.lower(), "value": value})
    else:
        raise KeyError(attr)
    return rows


def print_rows(rows: list[dict], output: str, columns: list[str] | None = None, out=None) -> None:
    import sys

    out = out or sys.stdout
    if output == "json":
        json.dump(rows, out, indent=2, default=str)
        out.write("\n")
        return
    if not rows:
        out.write("(none)\n")
        return
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out.write("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip() + "\n")
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() + "\n")


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ",".join(_cell(x) for x in v) or "-"
    if isinstance(v, dict):
        return ",".join(f"{k}={_cell(x)}" for k, x in v.items())
    if v is None:
        return "-"
    return str(v)
