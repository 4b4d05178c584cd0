"""`make demo`: the datapath enforcing a small built-in entitlement policy
between network namespaces, with real TCP and UDP.

A server namespace runs an "api" workload; a client namespace holds a
frontend workload (IPv4 and IPv6) and a contractor's laptop. The programs
are attached to the server's interface (XDP ingress, TC egress). The demo
checks every outcome against what the policy says, revokes an established
connection, prints the verdicts per rule and reason, and removes everything
it created. Exit status 0 means every check held.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dataplane.lab import Lab, wait_for
from dataplane import render
from dataplane.render import print_rows, rows_for
from loader import abi, tables
from loader.instance import Datapath
from loader.tables import PolicyEntry

API, FRONTEND, CONTRACTOR, LABNET = 1000, 1001, 1002, 1003
NAMES = {API: "api", FRONTEND: "frontend", CONTRACTOR: "contractor", LABNET: "lab-net",
         abi.ReservedIdentity.WORLD: "world"}
IDENTITIES = {
    "10.77.0.1/32": API, "fd77::1/128": API,
    "10.77.0.2/32": FRONTEND, "fd77::2/128": FRONTEND,
    "10.77.0.3/32": CONTRACTOR,
    "10.77.0.0/24": LABNET,
}
IN, OUT = abi.Direction.INGRESS, abi.Direction.EGRESS
ALLOW, AUDIT, DENY = abi.Verdict.ALLOW, abi.Verdict.AUDIT, abi.Verdict.DENY
TCP, UDP = 6, 17
RULES = {
    1: "frontend may call api on tcp/8080",
    2: "anyone may query api on udp/5353",
    3: "frontend -> api tcp/9090 (admin): audit only",
    4: "contractor may reach nothing on api",
    5: "api may call frontend on tcp/7000",
}
POLICY = [
    PolicyEntry(API, FRONTEND, IN, TCP, 8080, 8080, ALLOW, 1),
    PolicyEntry(API, 0, IN, UDP, 5353, 5353, ALLOW, 2),
    PolicyEntry(API, FRONTEND, IN, TCP, 9090, 9090, AUDIT, 3),
    PolicyEntry(API, CONTRACTOR, IN, 0, 0, 65535, DENY, 4),
    PolicyEntry(API, FRONTEND, OUT, TCP, 7000, 7000, ALLOW, 5),
]

# (description, from-namespace, probe, src, dst, port, expected to pass, rule expected)
CHECKS = [
    ("frontend -> api tcp/8080", "client", "tcp", "10.77.0.2", "10.77.0.1", 8080, True, 1),
    ("frontend -> api tcp/8080 over IPv6", "client", "tcp", "fd77::2", "fd77::1", 8080, True, 1),
    ("frontend -> api tcp/22 (no rule)", "client", "tcp", "10.77.0.2", "10.77.0.1", 22, False, 0),
    ("contractor -> api tcp/8080", "client", "tcp", "10.77.0.3", "10.77.0.1", 8080, False, 4),
    ("frontend -> api udp/5353", "client", "udp", "10.77.0.2", "10.77.0.1", 5353, True, 2),
    ("contractor -> api udp/5353 (deny beats allow)", "client", "udp", "10.77.0.3", "10.77.0.1", 5353, False, 4),
    ("frontend -> api tcp/9090 (audit: passes, reported)", "client", "tcp", "10.77.0.2", "10.77.0.1", 9090,
     True, 3),
    ("api -> frontend tcp/7000 (outbound; replies pass)", "server", "tcp", "10.77.0.1", "10.77.0.2", 7000, True, 5),
    ("api -> contractor tcp/7000 (outbound, no rule)", "server", "tcp", "10.77.0.1", "10.77.0.3", 7000, False, 0),
]


def say(text: str = "") -> None:
    print(text, flush=True)


def probe(lab: Lab, ns: str, kind: str, src: str, dst: str, port: int, timeout: float = 1.0) -> dict:
    out = lab.run(ns, [sys.executable, "-m", "dataplane.probe", kind, src, dst, str(port), str(timeout)])
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"ok": False, "error": out.stderr.strip() or "no output"}


def start_servers(lab: Lab, ns: str, addr: str, tcp_ports: list[int], udp_ports: list[int]) -> None:
    for kind, ports in (("serve-tcp", tcp_ports), ("serve-udp", udp_ports)):
        if not ports:
            continue
        proc = lab.popen(ns, [sys.executable, "-m", "dataplane.probe", kind, addr, *map(str, ports)])
        line = proc.stdout.readline().decode().strip()
        if line != "ready":
            raise RuntimeError(f"{kind} in {ns} did not start: {proc.stderr.read().decode()[-300:]}")


def revoke_demo(lab: Lab, dp: Datapath, client: str) -> tuple[bool, float | None]:
    """Streams from the frontend to api:8080, revokes the frontend's
    identity mid-stream, and measures how long echoes keep arriving."""
    proc = lab.popen(client, [sys.executable, "-m", "dataplane.probe", "stream", "10.77.0.2", "10.77.0.1", "8080"])
    if proc.stdout.readline().decode().strip() != "connected":
        return False, None
    last_echo = None
    for _ in range(40):  # let the flow run for a moment
        line = proc.stdout.readline().decode().split()
        if line and line[0] == "echo":
            last_echo = float(line[2])
    wanted = {n: i for n, i in IDENTITIES.items() if n != "10.77.0.2/32"}
    tables.apply_state(dp, wanted, POLICY)   # 10.77.0.2 now falls to lab-net: no rule
    revoked_at = time.monotonic()
    for raw in proc.stdout:
        line = raw.decode().split()
        if line and line[0] == "echo":
            last_echo = float(line[2])
        elif line and line[0] == "stalled":
            break
    proc.wait(timeout=10)
    cut_after = None if last_echo is None else max(0.0, last_echo - revoked_at)
    return True, cut_after


def recent_events(dp: Datapath, keep: int = 14) -> list[dict]:
    from loader.events import EventReader

    seen = []
    with EventReader(dp.events.fd, seen.append) as reader:
        reader.drain()
    rows = []
    for e in seen[-keep:]:
        port = f"{render.proto_name(e.proto)}/{e.dport}"
        rows.append({"src": str(e.src), "dst": str(e.dst), "service": port,
                     "direction": e.direction.name.lower(), "verdict": e.verdict.name.lower(),
                     "reason": e.reason.label if hasattr(e.reason, "label") else e.reason,
                     "rule": e.rule_id, "remote": NAMES.get(e.remote_id, e.remote_id)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingress", choices=["xdp", "tc"], default="xdp")
    args = parser.parse_args(argv)

    failures = 0
    dp = Datapath("demo")
    with Lab("dpdemo") as lab:
        try:
            say("== topology: namespaces 'client' and 'server' joined by veth")
            client, server = lab.ns("client"), lab.ns("server")
            _, server_if = lab.link(client, server, ["10.77.0.2/24", "10.77.0.3/24", "fd77::2/64"],
                                    ["10.77.0.1/24", "fd77::1/64"])
            start_servers(lab, server, "::", [8080, 9090, 22], [5353])
            start_servers(lab, client, "::", [7000], [])

            say("== compiling and loading the programs (bcc)")
            t0 = time.monotonic()
            outcome = dp.load()
            rec = dp.attach(server_if, netns=server, ingress=args.ingress)
            ingress = f"xdp ({rec['xdp_mode']})" if rec["ingress"] == "xdp" else "tc"
            say(f"   {outcome} in {time.monotonic() - t0:.1f} s; attached to {server_if} in {server}: "
                f"ingress {ingress}, egress tc")

            say("== identities and policy (built in)")
            tables.apply_state(dp, IDENTITIES, POLICY)
            dp.set_config(allow_sample=1)
            for net, ident in IDENTITIES.items():
                say(f"   {net:<16} -> {ident} ({NAMES[ident]})")
            for rule, text in RULES.items():
                say(f"   rule {rule}: {text}")
            say("   anything else: denied (rule 0, default deny)")

            say("== traffic")
            wait_for(lambda: probe(lab, client, "tcp", "10.77.0.2", "10.77.0.1", 8080)["ok"], timeout=5)
            for desc, ns, kind, src, dst, port, expect, rule in CHECKS:
                before = dp.rule_counter(rule)[0]
                result = probe(lab, client if ns == "client" else server, kind, src, dst, port)
                counted = dp.rule_counter(rule)[0] > before
                ok = result["ok"] == expect and counted
                failures += not ok
                verdict = "passed" if result["ok"] else "blocked"
                say(f"   {'ok  ' if ok else 'FAIL'} {desc:<52} {verdict:<8} rule {rule}"
                    + ("" if counted else "  (rule counter did not move)"))

            say("== revocation of an established connection")
            started, cut_after = revoke_demo(lab, dp, client)
            ok = started and cut_after is not None and cut_after < 0.1
            failures += not ok
            shown = "n/a" if cut_after is None else f"{cut_after * 1000:.1f} ms"
            say(f"   {'ok  ' if ok else 'FAIL'} frontend's live tcp/8080 stream stopped {shown} after its "
                f"identity was revoked")

            say("\n== verdict events (ring buffer: every drop and audit, sampled allows)")
            print_rows(recent_events(dp), "table")
            say("\n== verdicts per rule")
            rows = [{"rule": r["rule"], "meaning": RULES.get(r["rule"], "default deny"), "packets": r["packets"],
                     "bytes": r["bytes"]} for r in rows_for("rules", dp)]
            print_rows(rows, "table")
            say("\n== verdicts per reason")
            print_rows(rows_for("reasons", dp), "table")
            say("\n== maps")
            print_rows(dp.map_summary(), "table", ["name", "type", "entries", "capacity"])
        finally:
            if dp.is_loaded():
                dp.unload()
    say(f"\n{'all checks held' if not failures else f'{failures} check(s) failed'}; "
        "namespaces, programs and pins removed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
