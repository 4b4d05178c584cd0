"""Operator mistakes and hostile environments: `dataplane bpf attach` fails
with a one-line error (no traceback) and a non-zero exit, and leaves nothing
half-done: no XDP program or tc filter of ours on the interface, and no pins
or state for an instance that was not loaded before."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from dataplane.lab import Lab
from loader import attach, libbpf
from loader.compile import kernel_headers_present
from loader.errors import PrivilegeError
from loader.instance import CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN, Datapath
from loader.netns import in_netns
from tests.conftest import require_root
from tests.netns.helpers import (ROOT, assert_nothing_attached, cli, cli_json, hooks_on, instance_name,
                                 leftovers, unload_if_present)

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
NO_CAPS = ["setpriv", "--inh-caps=-all", "--bounding-set=-bpf,-sys_admin,-net_admin,-perfmon"]
EMPTY_MODULES = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs none /lib/modules && exec "$@"', "sh"]

# Reads a packet byte without comparing against data_end first: the
# verifier must refuse it ("invalid access to packet").
UNCHECKED_EGRESS = r"""/* SPDX-License-Identifier: Apache-2.0 */
#include "lib/skb.h"

int dp_tc_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;

	if (*(volatile __u8 *)(data + 64) == 0xff)
		return TC_ACT_SHOT;
	return dp_tc(skb, DP_HOOK_TC_EGRESS, DP_DIR_EGRESS);
}
"""

FOREIGN_XDP = rb"""
int foreign_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
"""
XDP_MODE_FLAGS = {"native": libbpf.XDP_FLAGS_DRV_MODE, "generic": libbpf.XDP_FLAGS_SKB_MODE}


def one_line_error(out: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command, checked to be an operator error."""
    assert out.returncode != 0, f"expected a failure; stdout: {out.stdout}"
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr:\n{out.stderr}"
    assert lines[0].startswith("dataplane: error: "), lines[0]
    return lines[0]


# --- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab():
    """A namespace for the interfaces under test and one for their peers."""
    require_root()
    with Lab() as lab:
        yield lab, lab.ns("s"), lab.ns("p")


@pytest.fixture
def iface(lab):
    """A fresh veth in the test namespace: (namespace, interface name)."""
    lab, ns, peer_ns = lab
    ifname, _ = lab.link(ns, peer_ns, [], [])
    assert_nothing_attached(ns, ifname)
    yield ns, ifname
    subprocess.run(["ip", "-n", ns, "link", "del", ifname], capture_output=True)


@pytest.fixture
def fresh_instance(request):
    """A name no instance has; whatever a test leaves under it is unloaded after."""
    name = instance_name(f"bad_{request.node.name}".replace("[", "_").replace("]", "").replace("-", "_"))
    assert not leftovers(name)
    yield name
    unload_if_present(name)


@pytest.fixture(scope="module")
def loaded():
    require_root()
    dp = Datapath(instance_name("bad_loaded"))
    try:
        assert dp.load() == "loaded"
        yield dp
    finally:
        dp.unload()


@pytest.fixture
def foreign_xdp(iface, request):
    """A program this project did not load, attached to the interface with
    libbpf; yields its id."""
    from bcc import BPF

    ns, ifname = iface
    mode = getattr(request, "param", "native")
    b = BPF(text=FOREIGN_XDP)
    try:
        fd = b.load_func(b"foreign_pass", BPF.XDP).fd
        prog_id = libbpf.prog_info(fd).id
        ifindex = attach.ifindex_of(ifname, ns)
        with in_netns(ns):
            ret = libbpf.lib().bpf_xdp_attach(ifindex, fd, XDP_MODE_FLAGS[mode], None)
        assert ret == 0, f"attaching the foreign program: {os.strerror(-ret)}"
        assert attach.xdp_query(ifname, ns) == (prog_id, mode)
        yield prog_id
    finally:
        b.cleanup()


def assert_untouched(ns: str, ifname: str, instance: str) -> None:
    assert_nothing_attached(ns, ifname)
    assert not leftovers(instance), f"left behind: {leftovers(instance)}"


# --- (a) privileges --------------------------------------------------------------------

@pytest.mark.parametrize("who", ["nobody", "root-without-caps"])
def test_not_privileged(who, iface, fresh_instance):
    ns, ifname = iface
    prefix = NOBODY if who == "nobody" else NO_CAPS
    # The wrapper really takes the capabilities away.
    caps = subprocess.run([*prefix, sys.executable, "-c", "print(open('/proc/self/status').read())"],
                          capture_output=True, text=True, check=True).stdout
    eff = int(next(l for l in caps.splitlines() if l.startswith("CapEff:")).split()[1], 16)
    for cap in (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_PERFMON):
        assert not eff & (1 << cap), f"capability {cap} still effective under {prefix}"

    out = cli("bpf", "attach", ifname, "--netns", ns, instance=fresh_instance, prefix=prefix)

    line = one_line_error(out)
    assert "permission denied" in line.lower() and "needs root" in line, line
    assert "CAP_NET_ADMIN" in line, line  # the missing capabilities are named
    assert out.returncode == PrivilegeError.exit_code
    assert_untouched(ns, ifname, fresh_instance)


# --- (b) unknown interface, (c) unknown namespace ----------------------------------------

def test_unknown_interface(iface, fresh_instance):
    ns, ifname = iface
    out = cli("bpf", "attach", "nosuchif0", "--netns", ns, instance=fresh_instance)
    line = one_line_error(out)
    assert "'nosuchif0'" in line and "not found" in line, line
    assert_untouched(ns, ifname, fresh_instance)


def test_unknown_interface_keeps_loaded_instance(iface, loaded):
    """A loaded instance stays loaded, and stays attached where it was."""
    ns, ifname = iface
    out = cli("bpf", "attach", ifname, "--netns", ns, instance=loaded.instance)
    assert out.returncode == 0, out.stderr
    try:
        out = cli("bpf", "attach", "nosuchif0", "--netns", ns, instance=loaded.instance)
        line = one_line_error(out)
        assert "'nosuchif0'" in line and "not found" in line, line
        assert loaded.is_loaded()
        status = cli_json("bpf", "status", instance=loaded.instance)
        assert [a["ifname"] for a in status["attachments"]] == [ifname]
        assert all(status["attachments"][0]["present"].values()), status["attachments"]
    finally:
        out = cli("bpf", "detach", ifname, "--netns", ns, instance=loaded.instance)
    assert out.returncode == 0, out.stderr
    assert_nothing_attached(ns, ifname)


def test_unknown_network_namespace(iface, fresh_instance):
    ns, ifname = iface
    missing = f"dpnt-nosuchns-{os.getpid()}"
    out = cli("bpf", "attach", ifname, "--netns", missing, instance=fresh_instance)
    line = one_line_error(out)
    assert repr(missing) in line and "does not exist" in line, line
    assert not os.path.exists(f"/run/netns/{missing}")
    assert_untouched(ns, ifname, fresh_instance)


# --- (d) verifier rejection ------------------------------------------------------------

def test_verifier_rejection(tmp_path, iface, fresh_instance):
    ns, ifname = iface
    bpf_dir = tmp_path / "bpf"
    shutil.copytree(ROOT / "bpf", bpf_dir)
    (bpf_dir / "tc_egress.c").write_text(UNCHECKED_EGRESS)

    out = cli("bpf", "attach", ifname, "--netns", ns, "--bpf-dir", bpf_dir, instance=fresh_instance)

    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("dataplane: error: "), out.stderr
    assert "dp_tc_egress" in lines[0] and "verifier" in lines[0], lines[0]
    log = "\n".join(lines[1:])
    assert "invalid access to packet" in log, out.stderr
    assert "tc_egress.c" in log, out.stderr     # line info names the source
    assert_untouched(ns, ifname, fresh_instance)


# --- (e) missing kernel headers ----------------------------------------------------------

def test_missing_kernel_headers(iface, fresh_instance):
    ns, ifname = iface
    assert kernel_headers_present() is None, "this test needs the host's kernel headers to hide them"

    out = cli("bpf", "attach", ifname, "--netns", ns, instance=fresh_instance, prefix=EMPTY_MODULES)

    line = one_line_error(out)
    assert "kernel headers missing" in line, line
    assert f"/lib/modules/{os.uname().release}/build" in line, line
    assert kernel_headers_present() is None, "the empty /lib/modules leaked out of its mount namespace"
    assert_untouched(ns, ifname, fresh_instance)


# --- (f) a foreign XDP program ------------------------------------------------------------

def test_foreign_xdp_refused_fresh_instance(iface, foreign_xdp, fresh_instance):
    ns, ifname = iface
    out = cli("bpf", "attach", ifname, "--netns", ns, instance=fresh_instance)

    line = one_line_error(out)
    assert f"XDP program id {foreign_xdp} " in line and "--force" in line, line
    assert attach.xdp_query(ifname, ns)[0] == foreign_xdp
    h = hooks_on(ns, ifname)
    assert not h["ingress"] and not h["egress"] and not h["clsact"], h
    assert not leftovers(fresh_instance), leftovers(fresh_instance)


@pytest.mark.parametrize("foreign_xdp", ["native", "generic"], indirect=True)
def test_foreign_xdp_refused_then_forced(iface, foreign_xdp, loaded):
    ns, ifname = iface
    ours = loaded.program_info("xdp_ingress")["id"]

    out = cli("bpf", "attach", ifname, "--netns", ns, instance=loaded.instance)
    line = one_line_error(out)
    assert f"XDP program id {foreign_xdp} " in line, line
    assert attach.xdp_query(ifname, ns)[0] == foreign_xdp
    h = hooks_on(ns, ifname)
    assert not h["ingress"] and not h["egress"] and not h["clsact"], h
    assert loaded.is_loaded()
    assert cli_json("bpf", "status", instance=loaded.instance)["attachments"] == []

    out = cli("bpf", "attach", ifname, "--netns", ns, "--force", instance=loaded.instance)
    try:
        assert out.returncode == 0, out.stderr
        assert attach.xdp_query(ifname, ns)[0] == ours
        egress = attach.tc_filters(ifname, ns, "egress")
        assert [f["prog_id"] for f in egress] == [loaded.program_info("tc_egress")["id"]]
    finally:
        out = cli("bpf", "detach", ifname, "--netns", ns, instance=loaded.instance)
    assert out.returncode == 0, out.stderr
    assert_nothing_attached(ns, ifname)
