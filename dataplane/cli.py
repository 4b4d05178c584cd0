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

    name = args.map.removeprefix("dp_").removesuffix("_v1")
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
        current = tables.read_identities(dp, gen)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="dataplane: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except DataplaneError as e:
        print(f"dataplane: error: {e}", file=sys.stderr)
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
