"""Real traffic between a client and a server namespace, with the datapath
attached to the server's veth (XDP or TC ingress, TC egress).

The server side runs every listener the tests use; each test sets the
ipcache and policy it needs and forgets tracked flows first.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from dataplane.lab import Lab, wait_for
from loader import tables
from loader.abi import Reason
from loader.instance import Datapath
from tests.conftest import require_root
from tests.netns.helpers import (ALLOW, CLIENT_ID, DENIED_WAIT, DENY, EGRESS, INGRESS, OTHER_ID, SERVER_ID,
                                 START_TIMEOUT, TCP, UDP, Follower, Topology, assert_nothing_attached, cli,
                                 cli_json, configure, ct_rows_for, delta, endpoint, entry, instance_name,
                                 leftovers, make_topology, reasons, request, requests_at_once, server_events,
                                 start_peer, start_server)

TCP_ALLOWED, TCP_NO_ENTRY, TCP_DENIED, TCP_STREAM = 8080, 8081, 8082, 8090
UDP_ALLOWED, UDP_NO_ENTRY = 5353, 5354
OUT_ALLOWED, OUT_NO_ENTRY = 9090, 9091

RULE_TCP, RULE_TCP_DENY, RULE_STREAM, RULE_UDP, RULE_OUT = 10, 11, 12, 20, 30

POLICY = [
    entry(SERVER_ID, CLIENT_ID, INGRESS, TCP, TCP_ALLOWED, ALLOW, RULE_TCP),
    entry(SERVER_ID, CLIENT_ID, INGRESS, TCP, TCP_DENIED, DENY, RULE_TCP_DENY),
    entry(SERVER_ID, CLIENT_ID, INGRESS, TCP, TCP_STREAM, ALLOW, RULE_STREAM),
    entry(SERVER_ID, CLIENT_ID, INGRESS, UDP, UDP_ALLOWED, ALLOW, RULE_UDP),
    # Outbound only: nothing lets the client open a connection to the server on this port.
    entry(SERVER_ID, CLIENT_ID, EGRESS, TCP, OUT_ALLOWED, ALLOW, RULE_OUT),
]

FAMILIES = ["ipv4", "ipv6"]
STREAM_INTERVAL = 0.005
REVOCATION_BOUND_MS = 100.0


@dataclasses.dataclass
class Net:
    dp: Datapath
    topo: Topology
    lab: Lab
    ingress: str
    server: Follower          # listeners in the server namespace
    client_side: Follower     # listeners in the client namespace (for outbound flows)


@pytest.fixture(scope="module")
def datapath():
    require_root()
    dp = Datapath(instance_name("traffic"))
    try:
        assert dp.load() == "loaded"
        yield dp
    finally:
        dp.unload()
    assert not leftovers(dp.instance)


@pytest.fixture(scope="module", params=["xdp", "tc"])
def net(request, datapath):
    ingress = request.param
    lab = Lab()
    topo = None
    try:
        topo = make_topology(lab)
        # Attached through the CLI, which adopts the loaded instance.
        out = cli("bpf", "attach", topo.server_if, "--netns", topo.server_ns, "--ingress", ingress,
                  instance=datapath.instance)
        assert out.returncode == 0, out.stderr
        assert f"ingress {ingress}" in out.stdout, out.stdout
        status = cli_json("bpf", "status", instance=datapath.instance)
        (att,) = [a for a in status["attachments"] if a["ifname"] == topo.server_if]
        assert att["ingress"] == ingress and att["present"] and all(att["present"].values()), att
        server = start_server(lab, topo.server_ns, [
            f"tcp:{TCP_ALLOWED}:echo", f"tcp:{TCP_NO_ENTRY}:echo", f"tcp:{TCP_DENIED}:echo",
            f"tcp:{TCP_STREAM}:sink", f"udp:{UDP_ALLOWED}:echo", f"udp:{UDP_NO_ENTRY}:echo"])
        client_side = start_server(lab, topo.client_ns, [f"tcp:{OUT_ALLOWED}:echo", f"tcp:{OUT_NO_ENTRY}:echo"])
        yield Net(datapath, topo, lab, ingress, server, client_side)
        datapath.detach(topo.server_if, topo.server_ns)
        assert_nothing_attached(topo.server_ns, topo.server_if)
    finally:
        if topo is not None:
            try:
                datapath.detach(topo.server_if, topo.server_ns)
            except Exception:
                pass  # already detached, or the failure being reported is elsewhere
        lab.close()


@pytest.fixture
def dp(net):
    configure(net.dp, net.topo.identities(), POLICY)
    return net.dp


@pytest.mark.parametrize("family", FAMILIES)
def test_allowed_tcp_connects_and_exchanges_data(net, dp, family):
    t = net.topo
    mark = net.server.mark()
    before, rule_before = reasons(dp), dp.rule_counter(RULE_TCP)[0]

    payload = f"hello over {family} " * 50
    res = request(net.lab, t.client_ns, "tcp-request", t.server(family), TCP_ALLOWED, payload)

    assert res["ok"], res
    assert res["reply"] == payload
    accepts = server_events(net.server, "accept", "tcp", TCP_ALLOWED, mark)
    assert len(accepts) == 1
    d = delta(before, reasons(dp))
    assert d[Reason.PASS_POLICY] >= 1, d            # the SYN, judged by policy
    assert d[Reason.PASS_REPLY] >= 1, d             # SYN-ACK and echo, through egress
    assert d[Reason.PASS_ESTABLISHED] >= 1, d       # the rest of the client's side
    assert dp.rule_counter(RULE_TCP)[0] > rule_before
    client_end = accepts[0][3]
    rows = ct_rows_for(cli_json("bpf", "map", "dump", "ct", instance=dp.instance),
                       client_end, endpoint(t.server(family), TCP_ALLOWED))
    assert len(rows) == 1, rows
    assert rows[0]["initiator"] == client_end and rows[0]["direction"] == "ingress"
    assert (rows[0]["rule"], rows[0]["local"], rows[0]["remote"]) == (RULE_TCP, SERVER_ID, CLIENT_ID)


@pytest.mark.parametrize("family", FAMILIES)
def test_denied_tcp_ports_do_not_connect(net, dp, family):
    t = net.topo
    mark = net.server.mark()
    before, deny_rule_before = reasons(dp), dp.rule_counter(RULE_TCP_DENY)[0]

    no_entry, denied = requests_at_once(net.lab, t.client_ns, [
        ("tcp-request", t.server(family), TCP_NO_ENTRY, "x", DENIED_WAIT),
        ("tcp-request", t.server(family), TCP_DENIED, "x", DENIED_WAIT)])

    # Listeners exist on both ports: a timeout (not a refusal) means the SYN was dropped.
    assert no_entry == {"ok": False, "reply": "", "error": "timeout"}
    assert denied == {"ok": False, "reply": "", "error": "timeout"}
    for port in (TCP_NO_ENTRY, TCP_DENIED):
        assert not server_events(net.server, "accept", "tcp", port, mark)
    d = delta(before, reasons(dp))
    assert d[Reason.DROP_POLICY_DEFAULT] >= 1, d
    assert d[Reason.DROP_POLICY_DENY] >= 1, d
    assert dp.rule_counter(RULE_TCP_DENY)[0] > deny_rule_before
    assert d[Reason.PASS_POLICY] == 0 and d[Reason.PASS_REPLY] == 0, d


@pytest.mark.parametrize("family", FAMILIES)
def test_udp_allowed_answers_denied_does_not(net, dp, family):
    t = net.topo
    mark = net.server.mark()
    before = reasons(dp)

    ok = request(net.lab, t.client_ns, "udp-request", t.server(family), UDP_ALLOWED, f"q-{family}")
    assert ok == {"ok": True, "reply": f"echo:q-{family}", "error": ""}
    d = delta(before, reasons(dp))
    assert d[Reason.PASS_POLICY] >= 1 and d[Reason.PASS_REPLY] >= 1, d

    before = reasons(dp)
    denied = request(net.lab, t.client_ns, "udp-request", t.server(family), UDP_NO_ENTRY, "q", DENIED_WAIT)
    assert denied == {"ok": False, "reply": "", "error": "timeout"}
    assert not server_events(net.server, "recv", "udp", UDP_NO_ENTRY, mark)
    assert len(server_events(net.server, "recv", "udp", UDP_ALLOWED, mark)) == 1
    d = delta(before, reasons(dp))
    assert d[Reason.DROP_POLICY_DEFAULT] >= 1, d


@pytest.mark.parametrize("family", FAMILIES)
def test_replies_to_allowed_outbound_flow_pass(net, dp, family):
    """The server namespace opens a connection out (an egress entry allows
    it); the replies come in through ingress, where no entry exists."""
    t = net.topo
    mark = net.client_side.mark()
    before = reasons(dp)

    res = request(net.lab, t.server_ns, "tcp-request", t.client(family), OUT_ALLOWED, f"out-{family}")

    assert res == {"ok": True, "reply": f"out-{family}", "error": ""}
    d = delta(before, reasons(dp))
    assert d[Reason.PASS_POLICY] >= 1, d     # the SYN, on egress
    assert d[Reason.PASS_REPLY] >= 2, d      # SYN-ACK and echo, on ingress
    (accept,) = server_events(net.client_side, "accept", "tcp", OUT_ALLOWED, mark)
    server_end = accept[3]
    rows = ct_rows_for(cli_json("bpf", "map", "dump", "ct", instance=dp.instance),
                       server_end, endpoint(t.client(family), OUT_ALLOWED))
    assert len(rows) == 1, rows
    assert rows[0]["initiator"] == server_end and rows[0]["direction"] == "egress"
    assert rows[0]["rule"] == RULE_OUT

    # Without an egress entry the same kind of connection does not get out.
    before = reasons(dp)
    res = request(net.lab, t.server_ns, "tcp-request", t.client(family), OUT_NO_ENTRY, "x", DENIED_WAIT)
    assert res == {"ok": False, "reply": "", "error": "timeout"}
    assert not server_events(net.client_side, "accept", "tcp", OUT_NO_ENTRY, mark)
    assert delta(before, reasons(dp))[Reason.DROP_POLICY_DEFAULT] >= 1


@pytest.mark.parametrize("how", ["remove", "change"])
@pytest.mark.parametrize("family", FAMILIES)
def test_revocation_stops_established_stream(net, dp, family, how, measurement):
    """An established stream stops within the bound once the client's
    identity is removed (or changed) and the epoch bumped, and stays stopped."""
    t = net.topo
    mark = net.server.mark()
    stream = start_peer(net.lab, t.client_ns, "tcp-stream", t.server(family), TCP_STREAM,
                        "--interval", STREAM_INTERVAL)
    try:
        line = stream.wait_line(lambda l: l.startswith(("connected", "error")), START_TIMEOUT)
        assert line and line.startswith("connected"), stream.describe()
        client_end = endpoint(t.client(family), int(line.split()[1]))
        server_end = endpoint(t.server(family), TCP_STREAM)

        def arrivals() -> list[int]:
            """When the server's recv() returned with stream data (monotonic ns)."""
            return [int(f[4]) for f in server_events(net.server, "recv", "tcp", TCP_STREAM, mark)
                    if f[3] == client_end]

        assert wait_for(lambda: len(arrivals()) >= 40, timeout=30), f"stream did not flow: {stream.describe()}"
        rows = ct_rows_for(cli_json("bpf", "map", "dump", "ct", instance=dp.instance), client_end, server_end)
        assert len(rows) == 1 and rows[0]["verdict"] == "allow", rows
        # Flowing right now: more arrive while we watch.
        seen = len(arrivals())
        assert wait_for(lambda: len(arrivals()) > seen + 2, timeout=30), f"stream stalled: {stream.describe()}"
        before = reasons(dp)

        call_started = time.monotonic_ns()
        tables.sync_identities(dp, t.identities(None if how == "remove" else OTHER_ID))
        dp.bump_epoch()
        revoked_at = time.monotonic_ns()

        time.sleep(1.0)
        after = reasons(dp)
        times = arrivals()
        assert stream.proc.poll() is None, f"the client stopped sending: {stream.describe()}"
    finally:
        stream.stop()

    last_ms = (max(times) - revoked_at) / 1e6
    late = [round((ts - revoked_at) / 1e6, 2) for ts in times if (ts - revoked_at) / 1e6 >= REVOCATION_BOUND_MS]
    during = sum(1 for ts in times if ts > call_started)
    measurement(f"revocation ({net.ingress} ingress, {family}, identity {how}d): call took "
                f"{(revoked_at - call_started) / 1e6:.2f} ms; last data reached the server "
                f"{last_ms:+.2f} ms after it returned ({during} receives after the call began; "
                f"negative: before it returned)")
    assert last_ms < REVOCATION_BOUND_MS, \
        f"{len(late)} receives at or past {REVOCATION_BOUND_MS} ms after revocation, first at {late[:5]} ms"
    d = delta(before, after)
    assert d[Reason.DROP_REVOKED] >= 1, d
    # The client kept trying (retransmissions, new segments) and all of it was dropped.
    drops = d[Reason.DROP_REVOKED] + d[Reason.DROP_POLICY_DEFAULT]
    assert drops >= 2, d
    assert not ct_rows_for(cli_json("bpf", "map", "dump", "ct", instance=dp.instance), client_end, server_end)
