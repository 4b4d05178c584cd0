"""Stands in for the long-running agent in the restart tests: loads the
datapath, attaches it, writes identities and policy, prints one line

    ready {"outcome": ..., "programs": {hook: prog id}, "attached": {hook: prog id}}

and sleeps until it is killed. Runs in the host's network namespace (the
interface's namespace is given with --netns), like the real agent.

    agent.py --instance NAME --interface IF --netns NS --ingress xdp|tc
             --identities '{"10.0.0.1/32": 400, ...}'
             --policy '[[local, remote, dir, proto, lo, hi, action, rule], ...]'
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from loader import tables  # noqa: E402
from loader.instance import HOOKS, Datapath  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instance", required=True)
    parser.add_argument("--interface", required=True)
    parser.add_argument("--netns")
    parser.add_argument("--ingress", choices=["xdp", "tc"], default="xdp")
    parser.add_argument("--identities", required=True)
    parser.add_argument("--policy", required=True)
    args = parser.parse_args()

    dp = Datapath(args.instance)
    outcome = dp.load()
    record = dp.attach(args.interface, args.netns, ingress=args.ingress)
    tables.sync_identities(dp, {ipaddress.ip_network(k): v for k, v in json.loads(args.identities).items()})
    tables.sync_policy(dp, [tables.PolicyEntry(*e) for e in json.loads(args.policy)])
    report = {"outcome": outcome, "programs": {h: dp.program_info(h)["id"] for h in HOOKS},
              "attached": record["prog_ids"]}
    print("ready " + json.dumps(report), flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
