"""Controllers in high availability on etcd: two controller processes
(mutual TLS) share a real etcd on loopback; one leads and alone accepts
writes, the other refuses them naming the leader. Agents (two lightweight
in-process ones and one real agent process enforcing in a namespace) are
spread over both controllers and converge on the state compiled from what
etcd holds.

- Failover: the leader is killed with SIGKILL; once its lease expires the
  follower leads, accepts a policy push and a session revoke, and every
  agent, including those that were connected to the dead leader, reconnects
  and applies the new revisions (the real agent's kernel drops the revoked
  session's address).
- etcd outage: etcd stops under running controllers; the leader steps down,
  writes are refused with UNAVAILABLE, reads are still served and agents
  keep enforcing exactly what they had; when etcd returns a leader is
  elected again and writes reach every agent.
"""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from dataplane.v1 import controller_pb2 as pb
from tests.conftest import require_root
from tests.fleet.ha_helpers import Fleet, wait_until
from tests.reliability import record

LIGHT_HOSTS = ["h1", "h2"]
REAL_HOST = "h3"
HOST_ADDRESS = {"h1": "10.90.0.1", "h2": "10.90.0.2", "h3": "10.90.0.3"}
ALICE = "10.90.2.1"      # the session revoked during the tests
BOB = "10.90.2.2"        # opened through the follower-then-leader CLI path

INVENTORY = """\
apiVersion: zt-dataplane/v1
kind: Inventory
hosts:
  - {name: h1, address: 10.90.0.1}
  - {name: h2, address: 10.90.0.2}
  - {name: h3, address: 10.90.0.3}
endpoints:
  - {name: web-1, host: h1, address: 10.90.1.1, labels: {app: web}}
  - {name: web-2, host: h2, address: 10.90.1.2, labels: {app: web}}
  - {name: web-3, host: h3, address: 10.90.1.3, labels: {app: web}}
"""


def policy(*ports: str) -> str:
    return ("apiVersion: zt-dataplane/v1\nkind: Policy\nrules:\n"
            "  - name: staff-to-web\n    action: allow\n    from: [{user: {group: staff}}]\n"
            "    to: [{workload: {app: web}}]\n"
            f"    ports: [{', '.join(ports)}]\n")


LEADER_TIMEOUT = 15.0       # a first leader among freshly started controllers
FAILOVER_LIMIT = 10.0       # lease TTL 3 s + one campaign period (1 s), with room for a loaded machine
FIRST_SYNC_TIMEOUT = 90.0   # includes the real agent compiling and attaching its datapath
SYNC_TIMEOUT = 30.0
STEP_DOWN_LIMIT = 10.0      # the leader notices etcd is gone at its next lease refresh (every 1 s)
REELECT_LIMIT = 30.0        # etcd restarts, the old lease runs out (3 s), a campaign wins


@pytest.fixture
def ha_fleet():
    require_root()
    f = Fleet(["ctl-a", "ctl-b"], LIGHT_HOSTS, [REAL_HOST])
    try:
        f.start_infrastructure()
        yield f
    finally:
        f.close()


@pytest.fixture
def report(capsys, request):
    """Prints a measurement line even when output is captured."""

    def say(text: str) -> None:
        with capsys.disabled():
            print(f"\n{request.node.name}: {text}", flush=True)

    return say


def single_leader(f: Fleet) -> str | None:
    leaders = f.leaders()
    return leaders[0] if len(leaders) == 1 else None


def wait_converged(f: Fleet, timeout: float) -> tuple[int, dict]:
    """Waits until every agent enforces the state compiled from etcd now."""
    def check():
        revision, digests = f.expected()
        return (revision, digests) if f.converged(revision, digests) else None
    got = wait_until(check, timeout, 0.1)
    assert got, f"agents did not converge on {f.expected()}:\n{f.describe()}"
    return got


def wait_status_clean(f: Fleet, controller: str, revision: int, on: dict[str, str] | None = None) -> dict:
    """fleet status on `controller` shows every agent connected, at
    `revision`, without error (and, given `on`, connected to that controller)."""
    hosts = LIGHT_HOSTS + [REAL_HOST]

    def check():
        st = f.status(controller)
        agents = {a["host"]: a for a in st["agents"]}
        ok = int(st["revision"]) == revision and all(
            h in agents and agents[h]["connected"] and int(agents[h]["appliedRevision"]) == revision
            and not agents[h]["error"] and (on is None or agents[h]["controller"] == on[h]) for h in hosts)
        return st if ok else None
    st = wait_until(check, SYNC_TIMEOUT, 0.2)
    assert st, f"fleet status on {controller} never showed every agent at {revision}: {f.status(controller)}"
    return st


def controllers_behind(f: Fleet, revision: int) -> dict[str, int]:
    """Live controllers whose fleet status is not at revision, with theirs."""
    revisions = {n: int(f.status(n)["revision"]) for n, c in f.controllers.items() if c.alive()}
    return {n: r for n, r in revisions.items() if r != revision}


def bring_up(f: Fleet) -> tuple[str, str]:
    """A leader and a follower, the initial state pushed to the leader,
    agents on both controllers; returns (leader, follower)."""
    leader = wait_until(lambda: single_leader(f), LEADER_TIMEOUT, 0.2)
    assert leader, f"no single leader: {[f.status(n) for n in f.controllers]}\n{f.describe()}"
    follower = next(n for n in f.controllers if n != leader)
    assert f.status(follower)["leader"] is False

    inv, pol = f.write_file("inventory.yaml", INVENTORY), f.write_file("policy-1.yaml", policy("tcp/443"))
    for args in (("inventory", "push", inv), ("policy", "push", pol),
                 ("session", "open", "--user", "alice", "--group", "staff", "--address", ALICE, "--id", "alice")):
        out = f.admin(*args, controllers=[leader])
        assert out.returncode == 0, f"{' '.join(map(str, args))} on the leader: {out.stderr}"

    L, F = f.controllers[leader].address, f.controllers[follower].address
    # The real agent and h1 start on the leader, h2 on the follower; all know both.
    f.start_real_agents({REAL_HOST: HOST_ADDRESS[REAL_HOST]}, order={REAL_HOST: [L, F]})
    f.start_light_agents(order={"h1": [L, F], "h2": [F, L]})
    return leader, follower


def test_follower_refuses_writes_and_failover_on_leader_kill(ha_fleet, report):
    f = ha_fleet
    leader, follower = bring_up(f)

    # Writes to the follower: refused, naming the leader.
    with pytest.raises(grpc.RpcError) as refused:
        f.rpc(follower, "ApplyPolicy", pb.ApplyPolicyRequest(text=policy("tcp/443", "tcp/444")))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    assert leader in refused.value.details(), refused.value.details()
    pushed = f.write_file("policy-refused.yaml", policy("tcp/443", "tcp/444"))
    out = f.admin("policy", "push", pushed, controllers=[follower])
    assert out.returncode != 0 and "UNAVAILABLE" in out.stderr and leader in out.stderr, out
    # The CLI given both moves on from the follower to the leader.
    out = f.admin("session", "open", "--user", "bob", "--group", "staff", "--address", BOB, "--id", "bob",
                  controllers=[follower, leader])
    assert out.returncode == 0, out.stderr
    state = f.etcd.state()
    assert "bob" in state.sessions and state.active_policy == 1, "the refused push or the session went astray"

    revision, _ = wait_converged(f, FIRST_SYNC_TIMEOUT)
    wait_status_clean(f, leader, revision, on={"h1": leader, "h2": follower, REAL_HOST: leader})
    assert int(f.status(follower)["revision"]) == revision, "the follower did not follow the leader's commits"
    kernel = f.real[REAL_HOST].identities()
    assert f"{ALICE}/32" in kernel and f"{BOB}/32" in kernel, kernel
    # h2 talks to the follower only; its job is registered all the same.
    listed = {e.name: (e.host, e.source) for e in f.rpc(leader, "ListEndpoints", pb.ListEndpointsRequest()).endpoints}
    assert listed.get("job-h2") == ("h2", "agent") and listed.get("job-h1") == ("h1", "agent"), listed

    # Kill the leader; the follower must take over and accept writes.
    t_kill = time.monotonic()
    f.controllers[leader].kill(signal.SIGKILL)
    refusals = []

    def write_to_survivor():
        try:
            return f.rpc(follower, "ApplyPolicy", pb.ApplyPolicyRequest(text=policy("tcp/443", "tcp/8443"),
                                                                        comment="after failover"), timeout=5)
        except grpc.RpcError as e:
            refusals.append((e.code(), e.details()))
            return None
    accepted = wait_until(write_to_survivor, 3 * FAILOVER_LIMIT, 0.05)
    failover = time.monotonic() - t_kill
    assert accepted, f"the follower never accepted a write after the leader died: {refusals[-3:]}\n{f.describe()}"
    assert {code for code, _ in refusals} <= {grpc.StatusCode.UNAVAILABLE}, refusals
    report(f"failover (SIGKILL of the leader -> the follower accepts a write): {failover:.2f} s "
           f"({len(refusals)} writes refused meanwhile)")
    assert failover < FAILOVER_LIMIT, f"failover took {failover:.1f} s"
    st = f.status(follower)
    assert st["leader"] is True and st["controller"] == follower, st

    # A session revoke through the CLI, the dead controller listed first.
    t_revoke = time.monotonic()
    out = f.admin("session", "revoke", "alice", controllers=[leader, follower])
    assert out.returncode == 0, out.stderr

    revision, _ = wait_converged(f, SYNC_TIMEOUT)
    converged = time.monotonic() - t_revoke
    assert revision == int(f.status(follower)["revision"]) and revision > accepted.state_revision
    assert f.etcd.state().active_policy == accepted.revision.number == 2
    wait_status_clean(f, follower, revision, on={h: follower for h in LIGHT_HOSTS + [REAL_HOST]})
    kernel = f.real[REAL_HOST].identities()
    assert f"{ALICE}/32" not in kernel, f"the revoked session's address is still in {REAL_HOST}'s kernel: {kernel}"
    assert f"{BOB}/32" in kernel, kernel
    assert f.real[REAL_HOST].alive(), f.real[REAL_HOST].log_tail()
    report(f"after failover every agent enforced the revoke {converged:.2f} s after the CLI call "
           f"(revision {revision})")
    record("etcd_leader_killed", {"failover_s": round(failover, 2), "writes_refused_meanwhile": len(refusals),
                                  "writes_lost": 0, "revoke_enforced_after_s": round(converged, 2)})


def test_etcd_outage_leader_steps_down_agents_keep_state(ha_fleet, report):
    f = ha_fleet
    leader, _ = bring_up(f)
    revision, _ = wait_converged(f, FIRST_SYNC_TIMEOUT)
    wait_status_clean(f, leader, revision)
    before = f.enforced()
    applies = {h: a.applies() for h, a in f.light.items()}
    kernel_before = f.real[REAL_HOST].identities()
    assert f"{ALICE}/32" in kernel_before, kernel_before

    t_stop = time.monotonic()
    f.etcd.stop()

    # The leader steps down (its log says so), and every write meanwhile is
    # refused with UNAVAILABLE.
    answers = []

    def leader_stepped_down():
        try:
            f.rpc(leader, "ApplyPolicy", pb.ApplyPolicyRequest(text=policy("tcp/443", "tcp/9443")), timeout=5)
            answers.append(("OK", ""))
        except grpc.RpcError as e:
            answers.append((e.code(), e.details()))
        return f"{leader} steps down" in f.controllers[leader].log.read_text()
    stepped = wait_until(leader_stepped_down, 3 * STEP_DOWN_LIMIT, 0.1)
    step_down = time.monotonic() - t_stop
    assert stepped, f"the leader kept leading without etcd: {answers[-3:]}\n{f.describe()}"
    assert {code for code, _ in answers} <= {grpc.StatusCode.UNAVAILABLE}, answers
    report(f"etcd stopped: leader {leader} stepped down after {step_down:.2f} s "
           f"(writes meanwhile: {len(answers)}, all refused UNAVAILABLE); refusal now: {answers[-1][1]!r}")
    assert step_down < STEP_DOWN_LIMIT, f"stepping down took {step_down:.1f} s"
    for name in f.controllers:
        with pytest.raises(grpc.RpcError) as refused:
            f.rpc(name, "OpenSession", pb.OpenSessionRequest(session=pb.Session(
                user="carol", groups=["staff"], addresses=["10.90.2.3"])))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, (name, refused.value.details())
    pushed = f.write_file("policy-outage.yaml", policy("tcp/443", "tcp/9443"))
    out = f.admin("policy", "push", pushed)
    assert out.returncode != 0 and "UNAVAILABLE" in out.stderr, out
    # Reads are still served, from what each controller holds.
    for name in f.controllers:
        listed = f.rpc(name, "ListPolicies", pb.ListPoliciesRequest())
        assert [r.number for r in listed.revisions if r.active] == [1], (name, listed)

    # Agents keep what they have: nothing new applied, the same digests,
    # still connected, the kernel unchanged.
    time.sleep(3)   # several campaign and watch retries against the missing etcd
    assert f.enforced() == before, f"state changed during the outage:\n{f.describe()}"
    assert {h: a.applies() for h, a in f.light.items()} == applies
    for h, a in f.light.items():
        assert a.agent.connected_to, f"{h} lost its controller during the etcd outage: {a.agent.status()}"
    assert f.real[REAL_HOST].alive(), f.real[REAL_HOST].log_tail()
    assert f.real[REAL_HOST].identities() == kernel_before

    # etcd returns: a leader again, and writes reach every agent.
    t_back = time.monotonic()
    f.etcd.start()
    new_leader = wait_until(lambda: single_leader(f), REELECT_LIMIT, 0.2)
    reelect = time.monotonic() - t_back
    assert new_leader, f"no single leader after etcd returned:\n{f.describe()}"
    report(f"etcd back: {new_leader} leads after {reelect:.2f} s")
    out = f.admin("policy", "push", pushed)
    assert out.returncode == 0, out.stderr
    out = f.admin("session", "revoke", "alice")
    assert out.returncode == 0, out.stderr

    # Every controller follows the new commits again (followers through
    # their etcd watch), and so does every agent, whichever it is on.
    committed = f.etcd.state().revision
    assert committed > before[REAL_HOST][0]
    caught_up = wait_until(lambda: not controllers_behind(f, committed), SYNC_TIMEOUT, 0.2)
    assert caught_up, (
        f"etcd holds revision {committed} but these controllers still serve older state after etcd "
        f"returned: {controllers_behind(f, committed)} (leader now {new_leader}); their agents cannot converge")
    revision, _ = wait_converged(f, SYNC_TIMEOUT)
    wait_status_clean(f, new_leader, revision)
    assert f"{ALICE}/32" not in f.real[REAL_HOST].identities()
