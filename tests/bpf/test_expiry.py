"""Session expiry enforced by the datapath itself: an ipcache entry past its
expires_s (CLOCK_MONOTONIC seconds) no longer counts, and a flow admitted
with it is judged again once that second has passed, with no agent or
controller involved."""

from __future__ import annotations

import pytest

from loader import abi, tables
from tests.bpf.packets import LOCAL, LOCAL_ID, REMOTE, REMOTE_ID, TCP_P, expect, tcp_frame

R, V = abi.Reason, abi.Verdict
IN = abi.Direction.INGRESS
FAMILIES = pytest.mark.parametrize("family", (4, 6), ids=("ipv4", "ipv6"))


def ids(family, remote_expires):
    plen = 32 if family == 4 else 128
    return {f"{LOCAL[family]}/{plen}": LOCAL_ID, f"{REMOTE[family]}/{plen}": (REMOTE_ID, remote_expires)}


def syn(family, sport=40000, flags="S"):
    return tcp_frame(family, REMOTE[family], LOCAL[family], sport, 80, flags)


ALLOW_80 = [tables.PolicyEntry(LOCAL_ID, REMOTE_ID, IN, TCP_P, 80, 80, V.ALLOW, 1)]


@FAMILIES
def test_a_live_entry_counts_and_its_expiry_goes_into_conntrack(dp, family):
    expires = tables.monotonic_seconds() + 3600
    tables.sync_identities(dp, ids(family, expires))
    tables.sync_policy(dp, ALLOW_80)
    out = expect(dp, "xdp_ingress", syn(family), R.PASS_POLICY)
    assert out.passed
    (_, ct), = dp.ct.items()
    assert ct.expires_s == expires and ct.remote_id == REMOTE_ID


@FAMILIES
def test_an_expired_entry_is_the_world(dp, family):
    tables.sync_identities(dp, ids(family, tables.monotonic_seconds() - 1))
    tables.sync_policy(dp, ALLOW_80)
    expect(dp, "xdp_ingress", syn(family), R.DROP_POLICY_DEFAULT)
    assert list(dp.ct.items()) == []


@FAMILIES
def test_an_established_flow_is_cut_when_its_session_expires(dp, family):
    """No epoch bump: the expiry alone makes the entry stale."""
    tables.sync_identities(dp, ids(family, tables.monotonic_seconds() + 3600))
    tables.sync_policy(dp, ALLOW_80)
    expect(dp, "xdp_ingress", syn(family), R.PASS_POLICY)
    expect(dp, "xdp_ingress", syn(family, flags="A"), R.PASS_ESTABLISHED)
    epoch = dp.read_config().epoch
    # Time passes: the session's end is now behind us (both in the ipcache and
    # in the conntrack entry, as the kernel would find them).
    past = tables.monotonic_seconds() - 1
    tables.sync_identities(dp, ids(family, past))
    (key, ct), = dp.ct.items()
    assert ct.expires_s != past
    ct.expires_s = past
    dp.ct.update(key, ct)
    expect(dp, "xdp_ingress", syn(family, flags="A"), R.DROP_REVOKED)
    assert dp.read_config().epoch == epoch
    assert list(dp.ct.items()) == []


def test_the_model_ignores_expired_entries(dp):
    from loader.model import Model

    tables.sync_identities(dp, ids(4, tables.monotonic_seconds() - 1))
    assert Model.from_datapath(dp).identity_of(REMOTE[4]) == abi.ReservedIdentity.WORLD
