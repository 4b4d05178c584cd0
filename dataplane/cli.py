"""The `dataplane` command line: noun-verb commands, `-o table|json` on
listings, one-line errors and a non-zero exit for operator mistakes."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys

from loader.errors import DataplaneError, PrivilegeError

MAP_NAMES = ["ipcache", "plens", "gen", "policy", "ranges", "ct", "frag", "config", "rules", "reasons", "stats"]
DEFAULT_INSTANCE = os.environ.get("DATAPLANE_INSTANCE", "default")


def _datapath(args, adopt: bool = True):
    from loader.instance import Datapath, check_privileges

    check_privileges()
    dp = Datapath(args.instance)
    if adopt:
        dp.adopt()
    return dp


def _build_options(args, pin_dir: str):
    """BuildOptions from the flags given, or None to keep the instance's own
    (or the defaults for a new one)."""
    from loader.compile import BuildOptions

    kw = {name: getattr(args, name) for name in ("identity", "ipcache_max", "policy_max", "ct_max", "rules_max")
          if getattr(args, name, None) is not None}
    return BuildOptions(pin_dir=pin_dir, **kw) if kw else None


# --- bpf ---------------------------------------------------------------------

def cmd_bpf_load(args) -> int:
    from loader.instance import Datapath

    dp = Datapath(args.instance)
    outcome = dp.load(_build_options(args, dp.pin_dir), reload=args.reload,
                      bpf_dir=args.bpf_dir)
    progs = dp.status()["programs"]
    print(f"{outcome} instance {args.instance}: " +
          ", ".join(f"{h} id {p['id']} ({p['verified_insns']} insns verified)" for h, p in progs.items()))
    return 0


def cmd_bpf_attach(args) -> int:
    from loader.attach import ifindex_of
    from loader.instance import Datapath, check_privileges

    check_privileges()
    dp = Datapath(args.instance)
    # An unknown interface must not leave a freshly loaded instance behind.
    ifindex_of(args.interface, args.netns)
    fresh = not dp.is_loaded()
    dp.load(_build_options(args, dp.pin_dir), bpf_dir=args.bpf_dir)
    try:
        rec = dp.attach(args.interface, args.netns, ingress=args.ingress, xdp_mode=args.xdp_mode,
                        tc_pref=args.tc_pref, force=args.force)
    except BaseException:
        if fresh:
            dp.unload()
        raise
    where = f" (netns {args.netns})" if args.netns else ""
    ingress = f"xdp/{rec['xdp_mode']}" if rec["ingress"] == "xdp" else "tc"
    print(f"attached {args.instance} to {args.interface}{where}: ingress {ingress}, egress tc")
    return 0


def cmd_bpf_detach(args) -> int:
    dp = _datapath(args, adopt=False)
    dp.detach(args.interface, args.netns)
    print(f"detached {args.instance} from {args.interface}")
    return 0


def cmd_bpf_unload(args) -> int:
    from loader.instance import Datapath, check_privileges

    check_privileges()
    dp = Datapath(args.instance)
    if not os.path.isdir(dp.pin_dir) and not os.path.exists(dp.state_path):
        raise DataplaneError(f"instance {args.instance!r} is not loaded")
    dp.unload()
    print(f"unloaded {args.instance}")
    return 0


def cmd_bpf_status(args) -> int:
    from dataplane.render import print_rows
    from loader.instance import list_instances

    dp = _datapath(args)
    st = dp.status()
    if args.output == "json":
        json.dump(st, sys.stdout, indent=2, default=str)
        print()
        return 0
    print(f"instance {st['instance']}  pins {st['pin_dir']}  sources {st['source_hash']}")
    others = [i for i in list_instances() if i != st["instance"]]
    if others:
        print(f"other instances: {', '.join(others)}")
    print("\nPROGRAMS")
    print_rows([{"hook": h, **{k: p[k] for k in ("id", "name", "tag", "verified_insns", "xlated_insns")}}
                for h, p in st["programs"].items()], "table")
    print("\nATTACHMENTS")
    print_rows([{"interface": a["ifname"], "netns": a.get("netns") or "-",
                 "ingress": "xdp/" + a.get("xdp_mode", "?") if a.get("ingress") == "xdp" else "tc",
                 "egress": "tc", "present": all(a.get("present", {}).values()) if a.get("present") else False,
                 "error": a.get("error", "")} for a in st["attachments"]], "table")
    print("\nMAPS")
    print_rows(st["maps"], "table", ["name", "type", "entries", "capacity", "key_size", "value_size"])
    return 0


def cmd_bpf_map_list(args) -> int:
    from dataplane.render import print_rows

    dp = _datapath(args)
    print_rows(dp.map_summary(), args.output, ["name", "type", "id", "entries", "capacity", "key_size",
                                               "value_size"])
    return 0


def cmd_bpf_map_dump(args) -> int:
    from dataplane.render import print_rows, rows_for
    from loader import abi

    name = args.map.removeprefix("dp_").removesuffix(f"_v{abi.ABI_VERSION}")
    if name not in MAP_NAMES:
        raise DataplaneError(f"unknown map {args.map!r}; one of: {', '.join(MAP_NAMES)}")
    dp = _datapath(args)
    print_rows(rows_for(name, dp, args.limit), args.output)
    return 0


def cmd_bpf_counters(args) -> int:
    from dataplane.render import print_rows, rows_for

    dp = _datapath(args)
    if args.output == "json":
        json.dump({k: rows_for(k, dp) for k in ("reasons", "rules", "stats")}, sys.stdout, indent=2)
        print()
        return 0
    for title, attr in (("VERDICTS BY REASON", "reasons"), ("VERDICTS BY RULE", "rules"), ("STATS", "stats")):
        print(title)
        print_rows(rows_for(attr, dp), "table")
        print()
    return 0


def _parse_prefix(text: str):
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise DataplaneError(f"bad address or prefix {text!r}: {e}") from None


def _edit_ipcache(dp, edit) -> None:
    """Applies edit(dict) to both generations, the live one first: one
    prefix changes, which a single map update does atomically."""
    from loader import tables

    live = tables.active_generation(dp)
    for gen in (live, 1 - live):
        current = tables.read_ipcache(dp, gen)
        tables.sync_identities(dp, edit(dict(current)), current, gen=gen)


def cmd_bpf_ipcache_set(args) -> int:
    dp = _datapath(args)
    net = _parse_prefix(args.prefix)
    _edit_ipcache(dp, lambda ids: {**ids, net: args.identity})
    if args.revoke:
        dp.bump_epoch()
    print(f"{net} -> identity {args.identity}")
    return 0


def cmd_bpf_ipcache_delete(args) -> int:
    from loader import tables

    dp = _datapath(args)
    net = _parse_prefix(args.prefix)
    if net not in tables.read_identities(dp):
        raise DataplaneError(f"{net} is not in the ipcache")
    _edit_ipcache(dp, lambda ids: {n: i for n, i in ids.items() if n != net})
    epoch = dp.bump_epoch()
    print(f"deleted {net}; epoch {epoch}: established flows are judged again")
    return 0


def cmd_bpf_epoch_bump(args) -> int:
    dp = _datapath(args)
    print(f"epoch {dp.bump_epoch()}")
    return 0


# --- policy --------------------------------------------------------------------

def _workspace(args, read_only: bool = False):
    """The instance's numbering and records. Read-only commands fall back to
    fresh numbering when the workspace cannot be read (not root, elsewhere)."""
    from dataplane.agent import Workspace

    try:
        return Workspace(args.instance, getattr(args, "state_dir", None))
    except PermissionError:
        if not read_only:
            raise
        return Workspace(args.instance, "/nonexistent/dataplane-workspace")


def _load_sources(args, need_inventory: bool = True):
    from dataplane.inventory import Inventory, load_inventory
    from dataplane.policy import load_policy

    policy = load_policy(args.policy)
    if args.inventory:
        inventory = load_inventory(args.inventory)
    elif need_inventory:
        raise DataplaneError("--inventory is needed: the policy names identities the inventory defines")
    else:
        inventory = Inventory()
    return policy, inventory


def _compiler(args, policy, inventory):
    """A compiler numbering identities like the instance's workspace, without
    saving new numbers (read-only commands must not change them)."""
    from dataplane.compiler import Compiler

    ws = _workspace(args, read_only=True)
    return Compiler(policy, inventory, ws.identities, ws.rules)


def _hosts(inventory, wanted):
    names = [h.name for h in inventory.hosts] or []
    return [wanted] if wanted else names


def _run_tests(explainer, policy) -> list[tuple]:
    results = []
    for t in policy.tests:
        try:
            exp = explainer.explain(t.source, t.destination, t.proto, t.port)
            got = exp.verdict
        except DataplaneError as e:
            exp, got = None, f"error: {e}"
        results.append((t, got, exp))
    return results


def _test_failure(t, got, exp) -> str:
    detail = ""
    if exp is not None and exp.judgements:
        detail = " (" + "; ".join(f"{j.host} {j.direction}: {j.verdict} by {j.rule}" for j in exp.judgements) + ")"
    elif exp is not None:
        detail = " (no enforcement point on the path: neither end runs on a host in the inventory)"
    return f"{t.where}: {t.name}: expected {t.expect.name.lower()}, got {got}{detail}"


def cmd_policy_validate(args) -> int:
    from dataplane.explain import Explainer

    policy, inventory = _load_sources(args, need_inventory=False)
    compiler = _compiler(args, policy, inventory)
    warnings = list(compiler.universe_warnings)
    seen = set(warnings)
    for host in _hosts(inventory, args.host) or ["(no host)"]:
        for w in compiler.compile(host).warnings:
            if w not in seen:
                seen.add(w)
                warnings.append(w)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    failures = []
    if policy.tests and args.inventory:
        failures = [_test_failure(t, got, exp) for t, got, exp in _run_tests(Explainer(compiler), policy)
                    if got != t.expect.name.lower()]
    elif policy.tests:
        print("warning: tests not run: they need --inventory", file=sys.stderr)
    if failures:
        raise SourceErrorLines(failures)
    print(f"{args.policy}: valid: {len(policy.rules)} rules, {len(policy.tests)} tests"
          + (" passed" if policy.tests and args.inventory else "") + f", {len(warnings)} warnings")
    return 0


class SourceErrorLines(DataplaneError):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def cmd_policy_test(args) -> int:
    from dataplane.explain import Explainer

    policy, inventory = _load_sources(args)
    if not policy.tests:
        raise DataplaneError(f"{args.policy}: no tests: section")
    results = _run_tests(Explainer(_compiler(args, policy, inventory)), policy)
    failed = 0
    for t, got, exp in results:
        ok = got == t.expect.name.lower()
        failed += not ok
        print(("ok    " if ok else "FAIL  ") + (t.name if ok else _test_failure(t, got, exp)))
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_policy_explain(args) -> int:
    from dataplane.explain import Explainer
    from dataplane.policy import parse_port_text

    policy, inventory = _load_sources(args)
    pr = parse_port_text(args.port)
    if isinstance(pr, str):
        raise DataplaneError(f"--port {pr}")
    if pr.lo != pr.hi and pr.proto in (6, 17, 132):
        raise DataplaneError("--port names one port, e.g. tcp/443")
    exp = Explainer(_compiler(args, policy, inventory)).explain(args.source, args.destination, pr.proto,
                                                                0 if pr.lo == 0 else pr.lo)
    if args.output == "json":
        json.dump(exp.to_dict(), sys.stdout, indent=2)
        print()
        return 0
    print(f"{exp.source} ({exp.src_addr}) -> {exp.destination} ({exp.dst_addr}) {exp.service}: {exp.verdict.upper()}")
    if not exp.judgements:
        print("  no enforcement point on the path: neither end is a host or endpoint in the inventory")
    for j in exp.judgements:
        print(f"  {j.host} {j.direction}: {j.verdict} ({j.reason}) by rule {j.rule}")
        print(f"    local  {j.local['identity']}: {j.local['labels']}")
        print(f"    remote {j.remote['identity']}: {j.remote['labels']}")
    return 0


def cmd_policy_apply(args) -> int:
    from dataplane.agent import apply_compiled, compile_for, default_host

    policy, inventory = _load_sources(args)
    dp = _datapath(args)
    ws = _workspace(args)
    host = args.host or default_host()
    _, state = compile_for(policy, inventory, host, ws)
    for w in state.warnings:
        print(f"warning: {w}", file=sys.stderr)
    result = apply_compiled(dp, state, ws, {"policy": args.policy, "inventory": args.inventory})
    print(f"applied to {args.instance} as host {host}: {len(state.entries)} entries, {len(state.identities)} "
          f"prefixes; generation {result.generation} live, epoch {result.epoch}")
    return 0


def cmd_policy_show(args) -> int:
    record = _workspace(args).read_applied()
    if record is None:
        raise DataplaneError(f"no policy has been applied to instance {args.instance!r}")
    if args.output == "json":
        json.dump(record, sys.stdout, indent=2)
        print()
        return 0
    from dataplane.render import print_rows

    print(f"host {record['host']}, applied {record['applied_at']}, mode {record['mode']}, "
          f"generation {record['generation']}, epoch {record['epoch']}")
    for k, v in record.get("sources", {}).items():
        if k != "digests":
            print(f"{k}: {v}")
    c = record["counts"]
    print(f"{c['rules']} rules, {c['entries']} entries, {c['prefixes']} prefixes, {c['identities']} identities")
    if record.get("next_change"):
        print(f"next change by itself: {record['next_change']}")
    print()
    print_rows([{"rule": int(i), "name": n} for i, n in record["rules"].items()], "table")
    return 0


def cmd_identity_list(args) -> int:
    from dataplane.render import print_rows
    from loader import tables

    record = _workspace(args).read_applied()
    if record is None:
        raise DataplaneError(f"no policy has been applied to instance {args.instance!r}")
    prefixes: dict[int, list] = {}
    try:
        dp = _datapath(args)
        for net, n in tables.read_identities(dp).items():
            prefixes.setdefault(n, []).append(str(net))
    except DataplaneError:
        pass  # not loaded: labels only
    local = set(record.get("locals", []))
    rows = [{"identity": int(n), "labels": labels, "local": int(n) in local,
             "prefixes": sorted(prefixes.get(int(n), []))} for n, labels in record["identities"].items()]
    print_rows(rows, args.output)
    return 0


def cmd_bpf_policy_list(args) -> int:
    from dataplane.render import print_rows, rows_for

    dp = _datapath(args)
    record = _workspace(args).read_applied() or {}
    names = record.get("rules", {})
    rows = rows_for("policy", dp)
    for r in rows:
        r["rule_name"] = names.get(str(r["rule"]), "-" if r["rule"] else "default")
    print_rows(rows, args.output)
    return 0


# --- controller and fleet ------------------------------------------------------------

DEFAULT_CONTROLLER = os.environ.get("DATAPLANE_CONTROLLER", "127.0.0.1:7443")
DEFAULT_TLS_DIR = os.environ.get("DATAPLANE_TLS_DIR", "/etc/dataplane/pki")


def _tls(args, stem: str):
    """Credentials for stem (controller, agent-HOST, admin-NAME), or None with --insecure."""
    from dataplane import certs

    if getattr(args, "insecure", False):
        logging.getLogger("dataplane").warning("--insecure: plaintext gRPC, no client authentication")
        return None
    return certs.Credentials(args.tls_dir, stem)


def _admin_call(args, method: str, request):
    """Calls an admin RPC on the first controller that answers; writes go on
    to the next controller when one says it is not the leader."""
    import grpc

    from dataplane.fleet_agent import channel_to
    from dataplane.v1 import controller_pb2_grpc as pb_grpc

    tls = _tls(args, f"admin-{args.as_admin}")
    last = None
    for address in args.controller.split(","):
        with channel_to(address, tls) as channel:
            try:
                return getattr(pb_grpc.ControllerStub(channel), method)(request, timeout=args.timeout)
            except grpc.RpcError as e:
                last = e
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    continue
                break
    code = last.code().name if last else "UNAVAILABLE"
    details = last.details() if last else "no controller"
    raise DataplaneError(f"{method}: {code}: {details}")


def cmd_controller(args) -> int:
    from dataplane import controller
    from dataplane.store import open_store

    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    tls = _tls(args, "controller")
    store = open_store(args.store)
    controller.run(store, args.name or args.listen, args.listen, tls, metrics=args.metrics,
                   max_agents=args.max_agents)
    return 0


def cmd_certs_init(args) -> int:
    from dataplane import certs

    split = lambda v: [x for x in (v or "").split(",") if x]  # noqa: E731
    written = certs.init(args.dir, split(args.controller), split(args.agent), split(args.admin))
    print(f"{args.dir}: " + ", ".join(written))
    return 0


def cmd_policy_push(args) -> int:
    from dataplane.v1 import controller_pb2 as pb

    text = open(args.policy).read()
    r = _admin_call(args, "ApplyPolicy", pb.ApplyPolicyRequest(text=text, comment=args.comment or args.policy,
                                                                expected_revision=args.expect_revision or 0))
    for w in r.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"policy revision {r.revision.number} active ({r.revision.rules} rules); state revision {r.state_revision}")
    return 0


def cmd_policy_revisions(args) -> int:
    from dataplane.render import print_rows
    from dataplane.v1 import controller_pb2 as pb

    r = _admin_call(args, "ListPolicies", pb.ListPoliciesRequest())
    print_rows([{"revision": x.number, "active": x.active, "created": x.created_at, "rules": x.rules,
                 "digest": x.digest, "comment": x.comment} for x in r.revisions], args.output)
    return 0


def cmd_policy_get(args) -> int:
    from dataplane.v1 import controller_pb2 as pb

    r = _admin_call(args, "GetPolicy", pb.GetPolicyRequest(number=args.number or 0))
    sys.stdout.write(r.text if r.text.endswith("\n") else r.text + "\n")
    return 0


def cmd_policy_rollback(args) -> int:
    from dataplane.v1 import controller_pb2 as pb

    r = _admin_call(args, "RollbackPolicy", pb.RollbackRequest(number=args.number))
    print(f"policy revision {r.revision.number} active (the text of revision {args.number}); "
          f"state revision {r.state_revision}")
    return 0


def cmd_inventory_push(args) -> int:
    from dataplane.v1 import controller_pb2 as pb

    r = _admin_call(args, "ApplyInventory", pb.ApplyInventoryRequest(text=open(args.inventory).read()))
    print(f"inventory applied; state revision {r.state_revision}")
    return 0


def _pairs(items) -> dict:
    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise DataplaneError(f"{item!r}: want KEY=VALUE")
        out[k] = v
    return out


def _session_rows(sessions) -> list[dict]:
    return [{"id": x.id, "user": x.user, "groups": list(x.groups), "addresses": list(x.addresses),
             "device": dict(x.device), "expires": x.expires or "-", "opened": x.opened_at} for x in sessions]


def cmd_session_open(args) -> int:
    from dataplane.v1 import controller_pb2 as pb

    device = _pairs(args.posture)
    if args.device:
        device["id"] = args.device
    r = _admin_call(args, "OpenSession", pb.OpenSessionRequest(session=pb.Session(
        id=args.id or "", user=args.user, groups=args.group or [], device=device, addresses=args.address,
        expires=args.expires or "", host=args.host or "")))
    print(f"session {r.session.id} open; state revision {r.state_revision}")
    return 0


def cmd_session_posture(args) -> int:
    from dataplane.v1 import controller_pb2 as pb

    r = _admin_call(args, "UpdatePosture", pb.UpdatePostureRequest(id=args.id, device=_pairs(args.posture)))
    print(f"session {r.session.id}: posture updated; state revision {r.state_revision}")
    return 0


def cmd_session_revoke(args) -> int:
    from dataplane.v1 import controller_pb2 as pb

    r = _admin_call(args, "RevokeSession", pb.RevokeSessionRequest(id=args.id))
    print(f"session {r.session.id} revoked; state revision {r.state_revision}: its connections are cut on every host")
    return 0


def cmd_session_list(args) -> int:
    from dataplane.render import print_rows
    from dataplane.v1 import controller_pb2 as pb

    print_rows(_session_rows(_admin_call(args, "ListSessions", pb.ListSessionsRequest()).sessions), args.output)
    return 0


def cmd_fleet_status(args) -> int:
    from dataplane.render import print_rows
    from dataplane.v1 import controller_pb2 as pb

    r = _admin_call(args, "FleetStatus", pb.FleetStatusRequest())
    if args.output == "json":
        from google.protobuf import json_format

        print(json_format.MessageToJson(r, always_print_fields_with_no_presence=True))
        return 0
    print(f"controller {r.controller} ({'leader' if r.leader else 'follower'}), state revision {r.revision}, "
          f"policy revision {r.policy_revision}")
    if r.store_error:
        print(f"store unreachable ({r.store_error}): only this controller's own agents are shown")
    print_rows([{"host": a.host, "connected": a.connected, "applied": a.applied_revision, "lag": a.lag,
                 "controller": a.controller or "-", "apply_ms": round(a.apply_ms, 1), "last_seen": a.last_seen,
                 "error": a.error} for a in r.agents], "table")
    return 0


def cmd_fleet_endpoints(args) -> int:
    from dataplane.render import print_rows
    from dataplane.v1 import controller_pb2 as pb

    r = _admin_call(args, "ListEndpoints", pb.ListEndpointsRequest())
    print_rows([{"name": e.name, "host": e.host, "addresses": list(e.addresses), "labels": dict(e.labels),
                 "source": e.source} for e in r.endpoints], args.output)
    return 0


# --- observe ---------------------------------------------------------------------

def _observe_request(args):
    from dataplane.flows import FIELDS, FilterError, compile_filters, parse_since
    from dataplane.v1 import flow_pb2

    exprs = list(args.filter)
    for field in FIELDS:
        for value in getattr(args, f"f_{field}", None) or []:
            exprs.append(f"{field}={value}")
    try:
        compile_filters(exprs)          # the same checks the server makes, before connecting
        parse_since(args.since or "")
    except FilterError as e:
        raise DataplaneError(str(e)) from None
    number = args.last if args.last is not None else 20
    since = args.since or ""
    if args.follow and args.last is None and not since:
        # -f alone: only flows from now on (with --last N or --since: those first).
        import datetime as dt

        since = dt.datetime.now(dt.timezone.utc).isoformat()
        number = 0
    return flow_pb2.GetFlowsRequest(filter=exprs, number=number, follow=args.follow, since=since)


def _flow_row(f) -> dict:
    import datetime as dt

    def end(addr, port, ident):
        where = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        labels = dict(ident.labels)
        name = (labels.get("reserved") or labels.get("user") or labels.get("name") or labels.get("app")
                or labels.get("cidr") or "")
        return f"{where} ({ident.id}{' ' + name if name else ''})"

    t = dt.datetime.fromtimestamp(f.time_unix_ns / 1e9, dt.timezone.utc)
    return {"time": t.strftime("%H:%M:%S.%f")[:-3], "host": f.host, "source": end(f.source, f.source_port,
            f.source_identity), "destination": end(f.destination, f.destination_port, f.destination_identity),
            "proto": f.protocol, "dir": f.direction, "verdict": f.verdict.upper(), "rule": f.rule,
            "reason": f.reason}


def cmd_observe(args) -> int:
    import grpc
    from google.protobuf import json_format

    from dataplane.v1 import agent_pb2_grpc, controller_pb2_grpc

    request = _observe_request(args)
    if args.controller:
        from dataplane.fleet_agent import channel_to

        channel = channel_to(args.controller.split(",")[0], _tls(args, f"admin-{args.as_admin}"))
        call = controller_pb2_grpc.ControllerStub(channel).GetFlows(request)
        where = f"controller {args.controller}"
    else:
        from dataplane.agent_server import socket_path

        path = args.socket or socket_path(args.instance)
        if not os.path.exists(path):
            raise DataplaneError(f"no agent socket at {path}: is `dataplane --instance {args.instance} agent` "
                                 f"running? (fleet-wide: --controller)")
        channel = grpc.insecure_channel(f"unix:{path}")
        call = agent_pb2_grpc.AgentStub(channel).GetFlows(request)
        where = f"agent {path}"
    columns = ["time", "host", "source", "destination", "proto", "dir", "verdict", "rule", "reason"]
    widths = {"time": 12, "host": 10, "source": 30, "destination": 30, "proto": 6, "dir": 7, "verdict": 7,
              "rule": 20, "reason": 0}
    header = False
    try:
        for item in call:
            if item.WhichOneof("item") == "lost":
                if args.output == "json":
                    print(json.dumps({"lost": item.lost}), flush=True)
                else:
                    print(f"... {item.lost} flows lost (this client read too slowly)", flush=True)
                continue
            f = item.flow
            if args.output == "json":
                print(json.dumps(json_format.MessageToDict(f, preserving_proto_field_name=True)), flush=True)
                continue
            row = _flow_row(f)
            if not header:
                print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
                header = True
            print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip(), flush=True)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED:
            return 130
        raise DataplaneError(f"{where}: {e.code().name}: {e.details()}") from None
    except BrokenPipeError:
        return 0
    finally:
        channel.close()
    return 0


# --- agent -----------------------------------------------------------------------

def cmd_agent(args) -> int:
    from dataplane.agent import Agent, AgentOptions, default_host
    from dataplane.agent_server import serve_status
    from loader.attach import ifindex_of
    from loader.instance import Datapath, check_privileges

    if args.controller and (args.policy or args.inventory):
        raise DataplaneError("--controller (fleet mode) or --policy/--inventory (standalone), not both")
    if not args.controller and not (args.policy and args.inventory):
        raise DataplaneError("standalone mode needs --policy and --inventory; fleet mode needs --controller")
    check_privileges()
    for ifname in args.interface:
        ifindex_of(ifname, args.netns)
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    dp = Datapath(args.instance)
    if args.controller:
        import signal

        from dataplane.fleet_agent import FleetAgent, FleetOptions, load_endpoints

        host = args.host or default_host()
        agent = FleetAgent(dp, FleetOptions(
            controllers=args.controller.split(","), host=host, tls=_tls(args, f"agent-{host}"),
            interfaces=args.interface, netns=args.netns, ingress=args.ingress, state_dir=args.state_dir,
            endpoints=load_endpoints(args.endpoints) if args.endpoints else [], addresses=args.address or [],
            metrics=args.metrics, upload_flows=args.flow_upload, allow_control_lockout=args.allow_control_lockout))
        agent.start()
        server = serve_status(args.instance, agent.status, hub=agent.telemetry.hub)
        signal.signal(signal.SIGTERM, lambda *_: agent.stop())
        signal.signal(signal.SIGINT, lambda *_: agent.stop())
        agent.run()
        server.stop(0)
        logging.getLogger("dataplane.agent").info("stopping; the datapath keeps enforcing the last applied state")
        return 0
    agent = Agent(dp, AgentOptions(
        policy=args.policy, inventory=args.inventory, interfaces=args.interface, netns=args.netns,
        host=args.host, ingress=args.ingress, state_dir=args.state_dir, metrics=args.metrics))
    agent.start()
    server = serve_status(args.instance, agent.status, hub=agent.telemetry.hub)
    agent.run()
    server.stop(0)
    return 0


# --- parser --------------------------------------------------------------------

def _output(p):
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")


def _load_options(p):
    p.add_argument("--identity", choices=["hash", "lpm"],
                   help="identity lookup structure (default: hash per prefix length)")
    p.add_argument("--ipcache-max", dest="ipcache_max", type=int, help="ipcache capacity")
    p.add_argument("--policy-max", dest="policy_max", type=int, help="policy map capacity")
    p.add_argument("--ct-max", dest="ct_max", type=int, help="conntrack capacity")
    p.add_argument("--rules-max", dest="rules_max", type=int, help="highest rule id + 1")
    p.add_argument("--bpf-dir", dest="bpf_dir", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dataplane", description="eBPF zero-trust enforcement data plane")
    parser.add_argument("--instance", default=DEFAULT_INSTANCE,
                        help="instance name: pins live in /sys/fs/bpf/<instance> (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true")
    nouns = parser.add_subparsers(dest="noun", required=True, metavar="COMMAND")

    bpf = nouns.add_parser("bpf", help="programs, attachments and maps in the kernel")
    verbs = bpf.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("load", help="compile and load the programs (adopts pins that exist)")
    _load_options(p)
    p.add_argument("--reload", action="store_true", help="recompile and replace the programs; maps are kept")
    p.set_defaults(func=cmd_bpf_load)

    p = verbs.add_parser("attach", help="attach to an interface (loads first if needed)")
    p.add_argument("interface")
    p.add_argument("--netns", help="network namespace of the interface (/run/netns/NAME)")
    p.add_argument("--ingress", choices=["xdp", "tc"], default="xdp")
    p.add_argument("--xdp-mode", dest="xdp_mode", choices=["auto", "native", "generic"], default="auto")
    p.add_argument("--tc-pref", dest="tc_pref", type=int, default=0xDA)
    p.add_argument("--force", action="store_true", help="replace a program this instance did not attach")
    _load_options(p)
    p.set_defaults(func=cmd_bpf_attach)

    p = verbs.add_parser("detach", help="detach from an interface")
    p.add_argument("interface")
    p.add_argument("--netns")
    p.set_defaults(func=cmd_bpf_detach)

    p = verbs.add_parser("unload", help="detach everywhere, unpin, forget the instance")
    p.set_defaults(func=cmd_bpf_unload)

    p = verbs.add_parser("status", help="programs, attachments, maps")
    _output(p)
    p.set_defaults(func=cmd_bpf_status)

    p = verbs.add_parser("counters", help="verdicts per reason and per rule, global stats")
    _output(p)
    p.set_defaults(func=cmd_bpf_counters)

    mp = verbs.add_parser("map", help="list and dump maps")
    mverbs = mp.add_subparsers(dest="mverb", required=True, metavar="VERB")
    p = mverbs.add_parser("list", help="maps with entry counts and capacities")
    _output(p)
    p.set_defaults(func=cmd_bpf_map_list)
    p = mverbs.add_parser("dump", help="decoded entries of one map")
    p.add_argument("map", help=", ".join(MAP_NAMES))
    p.add_argument("--limit", type=int)
    _output(p)
    p.set_defaults(func=cmd_bpf_map_dump)

    ip = verbs.add_parser("ipcache", help="set or delete one address -> identity entry")
    iverbs = ip.add_subparsers(dest="iverb", required=True, metavar="VERB")
    p = iverbs.add_parser("set")
    p.add_argument("prefix")
    p.add_argument("identity", type=int)
    p.add_argument("--revoke", action="store_true",
                   help="also bump the epoch so established flows are judged again")
    p.set_defaults(func=cmd_bpf_ipcache_set)
    p = iverbs.add_parser("delete", help="delete and bump the epoch (revokes established flows)")
    p.add_argument("prefix")
    p.set_defaults(func=cmd_bpf_ipcache_delete)

    ep = verbs.add_parser("epoch", help="conntrack epoch")
    everbs = ep.add_subparsers(dest="everb", required=True, metavar="VERB")
    p = everbs.add_parser("bump", help="make every established flow be judged again")
    p.set_defaults(func=cmd_bpf_epoch_bump)

    bp = verbs.add_parser("policy", help="the policy map as the datapath sees it")
    bverbs = bp.add_subparsers(dest="pverb", required=True, metavar="VERB")
    p = bverbs.add_parser("list", help="entries of the live generation, with rule names")
    p.add_argument("--state-dir", dest="state_dir", help=argparse.SUPPRESS)
    _output(p)
    p.set_defaults(func=cmd_bpf_policy_list)

    pol = nouns.add_parser("policy", help="the entitlement policy: validate, test, explain, apply, show")
    pverbs = pol.add_subparsers(dest="verb", required=True, metavar="VERB")

    def sources(p, inventory_required=True):
        p.add_argument("policy", help="policy file (YAML or JSON)")
        p.add_argument("--inventory", "-i", required=inventory_required,
                       help="inventory file: hosts, endpoints, sessions, networks")
        p.add_argument("--state-dir", dest="state_dir", help=argparse.SUPPRESS)

    p = pverbs.add_parser("validate", help="check a policy (and its tests, given an inventory)")
    sources(p, inventory_required=False)
    p.add_argument("--host", help="compile for this host only (default: every host in the inventory)")
    p.set_defaults(func=cmd_policy_validate)

    p = pverbs.add_parser("test", help="run the policy's tests: section")
    sources(p)
    p.set_defaults(func=cmd_policy_test)

    p = pverbs.add_parser("explain", help="the verdict for one flow and the rule that decides it")
    sources(p)
    p.add_argument("--from", dest="source", required=True,
                   help="an address, workload:NAME, user:NAME or host:NAME")
    p.add_argument("--to", dest="destination", required=True, help="as --from")
    p.add_argument("--port", required=True, help="tcp/443, udp/53, icmp, ...")
    _output(p)
    p.set_defaults(func=cmd_policy_explain)

    p = pverbs.add_parser("apply", help="compile for this host and switch the datapath to it, atomically")
    sources(p)
    p.add_argument("--host", help="this host's name in the inventory (default: the hostname)")
    p.set_defaults(func=cmd_policy_apply)

    p = pverbs.add_parser("show", help="what is in force")
    p.add_argument("--state-dir", dest="state_dir", help=argparse.SUPPRESS)
    _output(p)
    p.set_defaults(func=cmd_policy_show)

    idn = nouns.add_parser("identity", help="identities in force")
    iv = idn.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = iv.add_parser("list", help="identity numbers, labels and addresses")
    p.add_argument("--state-dir", dest="state_dir", help=argparse.SUPPRESS)
    _output(p)
    p.set_defaults(func=cmd_identity_list)

    ag = nouns.add_parser("agent", help="enforce on this host: from files (standalone) or from a controller")
    ag.add_argument("--policy", help="standalone: the policy file")
    ag.add_argument("--inventory", help="standalone: the inventory file")
    ag.add_argument("--controller", help="fleet mode: controller address(es), comma-separated")
    ag.add_argument("--tls-dir", dest="tls_dir", default=DEFAULT_TLS_DIR,
                    help="fleet mode: ca.pem and agent-<host>.pem/.key (default: %(default)s)")
    ag.add_argument("--insecure", action="store_true", help="fleet mode without TLS (tests only)")
    ag.add_argument("--endpoints", help="fleet mode: the workloads this host runs (YAML list)")
    ag.add_argument("--address", action="append", help="fleet mode: this host's own address (repeat)")
    ag.add_argument("--interface", action="append", required=True, help="repeat for several")
    ag.add_argument("--netns", help="network namespace of the interfaces")
    ag.add_argument("--host", help="this host's name in the inventory (default: the hostname)")
    ag.add_argument("--ingress", choices=["xdp", "tc"], default="xdp")
    ag.add_argument("--state-dir", dest="state_dir",
                    help="numbering and applied-state records (default: /var/lib/dataplane/<instance>)")
    ag.add_argument("--metrics", metavar="HOST:PORT",
                    help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; "
                         "the conventional port is 9590)")
    ag.add_argument("--no-flow-upload", dest="flow_upload", action="store_false",
                    help="fleet mode: do not send flows to the controller")
    ag.add_argument("--allow-control-lockout", action="store_true",
                    help="fleet mode: apply a state even if it drops this agent's own connection to its "
                         "controllers (the host then needs fixing by hand)")
    ag.set_defaults(func=cmd_agent)

    def admin(p):
        p.add_argument("--controller", default=DEFAULT_CONTROLLER,
                       help="controller address(es), comma-separated (default: %(default)s)")
        p.add_argument("--tls-dir", dest="tls_dir", default=DEFAULT_TLS_DIR, help="default: %(default)s")
        p.add_argument("--as", dest="as_admin", default=os.environ.get("DATAPLANE_ADMIN", "admin"),
                       help="admin certificate name: admin-<NAME>.pem (default: %(default)s)")
        p.add_argument("--insecure", action="store_true", help=argparse.SUPPRESS)
        p.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)

    ct = nouns.add_parser("controller", help="run the controller (policy decision point)")
    ct.add_argument("--listen", default="0.0.0.0:7443")
    ct.add_argument("--store", default="sqlite:///var/lib/dataplane/controller.db",
                    help="sqlite:///PATH (one controller) or etcd://HOST:PORT[,...] (several); default: %(default)s")
    ct.add_argument("--name", help="this controller's name (default: the listen address)")
    ct.add_argument("--tls-dir", dest="tls_dir", default=DEFAULT_TLS_DIR,
                    help="ca.pem, controller.pem, controller.key (default: %(default)s)")
    ct.add_argument("--insecure", action="store_true", help="plaintext, no client authentication (tests only)")
    ct.add_argument("--metrics", metavar="HOST:PORT",
                    help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; "
                         "the conventional port is 9591)")
    ct.add_argument("--max-agents", dest="max_agents", type=int, default=1024,
                    help="agents connected at once (each holds a server thread; default: %(default)s)")
    ct.set_defaults(func=cmd_controller)

    ob = nouns.add_parser("observe", help="flows the datapath judged: drops, audits, sampled allows",
                          description="Flows from this host's agent (default) or, with --controller, from every "
                                      "agent connected to that controller. Filters combine with AND; a value may "
                                      "list alternatives: --verdict deny,audit.")
    ob.add_argument("--controller", nargs="?", const=DEFAULT_CONTROLLER,
                    help="fleet-wide, from a controller (default address: %(const)s)")
    ob.add_argument("--tls-dir", dest="tls_dir", default=DEFAULT_TLS_DIR, help=argparse.SUPPRESS)
    ob.add_argument("--as", dest="as_admin", default=os.environ.get("DATAPLANE_ADMIN", "admin"),
                    help=argparse.SUPPRESS)
    ob.add_argument("--insecure", action="store_true", help=argparse.SUPPRESS)
    ob.add_argument("--socket", help="the agent's socket (default: /run/dataplane/<instance>/agent.sock)")
    ob.add_argument("-f", "--follow", action="store_true", help="keep printing new flows")
    ob.add_argument("--last", type=int, help="the last N matching flows kept, 0 for all (default: 20; "
                                             "with -f and no --since: none, only new flows)")
    ob.add_argument("--since", help="RFC 3339 time or a duration ago: 90s, 5m, 2h")
    for flag, field in (("verdict", "verdict"), ("reason", "reason"), ("rule", "rule"), ("direction", "direction"),
                        ("protocol", "protocol"), ("host", "host"), ("ip", "ip"), ("from-ip", "source-ip"),
                        ("to-ip", "destination-ip"), ("port", "port"), ("from-port", "source-port"),
                        ("to-port", "destination-port"), ("label", "label"), ("from-label", "source-label"),
                        ("to-label", "destination-label"), ("identity", "identity")):
        ob.add_argument(f"--{flag}", dest=f"f_{field}", action="append", metavar="VALUE",
                        help=f"filter {field}=VALUE")
    ob.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE",
                    help="any filter field (see docs/metrics.md); repeat for several")
    ob.add_argument("-o", "--output", choices=["table", "json"], default="table",
                    help="json: one JSON object per line")
    ob.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    ob.set_defaults(func=cmd_observe)

    ce = nouns.add_parser("certs", help="a CA and certificates for a fleet")
    cv = ce.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = cv.add_parser("init", help="create the CA (if absent) and certificates")
    p.add_argument("--dir", required=True)
    p.add_argument("--controller", default="localhost,127.0.0.1,::1", help="controller names and addresses")
    p.add_argument("--agent", default="", help="agent host names, comma-separated")
    p.add_argument("--admin", default="admin", help="admin names, comma-separated")
    p.set_defaults(func=cmd_certs_init)

    p = pverbs.add_parser("push", help="send a policy to the controller: a new revision, active at once")
    p.add_argument("policy")
    p.add_argument("--comment")
    p.add_argument("--expect-revision", dest="expect_revision", type=int,
                   help="refuse unless this policy revision is the active one")
    admin(p)
    p.set_defaults(func=cmd_policy_push)
    p = pverbs.add_parser("revisions", help="the controller's policy revisions")
    admin(p)
    _output(p)
    p.set_defaults(func=cmd_policy_revisions)
    p = pverbs.add_parser("get", help="a policy revision's text (default: the active one)")
    p.add_argument("number", nargs="?", type=int)
    admin(p)
    p.set_defaults(func=cmd_policy_get)
    p = pverbs.add_parser("rollback", help="make an earlier revision's text active again")
    p.add_argument("number", type=int)
    admin(p)
    p.set_defaults(func=cmd_policy_rollback)

    inv = nouns.add_parser("inventory", help="the controller's inventory")
    invv = inv.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = invv.add_parser("push", help="hosts, endpoints and networks (sessions: dataplane session)")
    p.add_argument("inventory")
    admin(p)
    p.set_defaults(func=cmd_inventory_push)

    se = nouns.add_parser("session", help="user sessions (ZTNA)")
    sv = se.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = sv.add_parser("open", help="bind a user, groups and device posture to an address")
    p.add_argument("--user", required=True)
    p.add_argument("--group", action="append")
    p.add_argument("--device", help="device id")
    p.add_argument("--posture", action="append", help="KEY=VALUE, e.g. managed=true (repeat)")
    p.add_argument("--address", action="append", required=True, help="where the traffic comes from (repeat)")
    p.add_argument("--expires", help="RFC 3339 end, e.g. 2026-12-05T18:00:00Z")
    p.add_argument("--host", help="the device runs an agent as this host (it then enforces for the session)")
    p.add_argument("--id")
    admin(p)
    p.set_defaults(func=cmd_session_open)
    p = sv.add_parser("posture", help="replace a session's device attributes")
    p.add_argument("id")
    p.add_argument("--posture", action="append", required=True, help="KEY=VALUE (repeat)")
    admin(p)
    p.set_defaults(func=cmd_session_posture)
    p = sv.add_parser("revoke", help="end a session: its established connections are cut too")
    p.add_argument("id")
    admin(p)
    p.set_defaults(func=cmd_session_revoke)
    p = sv.add_parser("list")
    admin(p)
    _output(p)
    p.set_defaults(func=cmd_session_list)

    fl = nouns.add_parser("fleet", help="agents and what they enforce")
    fv = fl.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = fv.add_parser("status", help="agents, applied revision, lag")
    admin(p)
    _output(p)
    p.set_defaults(func=cmd_fleet_status)
    p = fv.add_parser("endpoints", help="endpoints the controller knows (inventory and agents)")
    admin(p)
    _output(p)
    p.set_defaults(func=cmd_fleet_endpoints)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="dataplane: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except DataplaneError as e:
        for line in getattr(e, "problems", None) or [str(e)]:
            print(f"dataplane: error: {line}", file=sys.stderr)
        return e.exit_code
    except PermissionError as e:
        print(f"dataplane: error: permission denied: {e.strerror or e} (run as root)", file=sys.stderr)
        return PrivilegeError.exit_code
    except ImportError as e:
        print(f"dataplane: error: {e}; run `make setup`", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
