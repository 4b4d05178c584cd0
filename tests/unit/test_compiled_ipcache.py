"""The compiled ipcache carries session ends, converted to the monotonic
seconds the datapath compares with."""

import datetime as dt

from dataplane.compiler import Compiler
from dataplane.identity import Allocator
from dataplane.inventory import parse_inventory
from dataplane.policy import parse_policy
from dataplane.source import loads

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)

INVENTORY = """
apiVersion: zt-dataplane/v1
hosts: [{name: h, address: 10.0.0.1}]
endpoints: [{name: app, host: h, address: 10.0.0.10, labels: {app: a}}]
sessions:
  - {user: alice, address: 10.0.0.50, expires: 2026-06-01T01:00:00Z}
  - {user: bob, address: 10.0.0.51}
"""
POLICY = """
apiVersion: zt-dataplane/v1
rules: [{name: r, action: allow, from: [{user: {}}], to: [{workload: {app: a}}], ports: [tcp/443]}]
"""


def test_session_entries_carry_their_end_in_monotonic_seconds():
    inv = parse_inventory(*loads(INVENTORY, "i.yaml"))
    pol = parse_policy(*loads(POLICY, "p.yaml"))
    state = Compiler(pol, inv, Allocator(None), Allocator(None, first=1), NOW).compile("h")
    cache = state.ipcache(wall_now=NOW, mono_now=1000)
    import ipaddress

    alice, bob = ipaddress.ip_network("10.0.0.50/32"), ipaddress.ip_network("10.0.0.51/32")
    assert cache[alice] == (state.identities[alice], 1000 + 3600)
    assert cache[bob] == state.identities[bob]          # no end: a plain identity
    # Already over by the time it is applied: expires at once, not "never".
    assert state.ipcache(wall_now=NOW + dt.timedelta(hours=2), mono_now=1000)[alice][1] == 1
