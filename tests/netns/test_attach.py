"""Attachment modes: native XDP where the driver has it, generic XDP with a
warning where it does not, and switching an interface between XDP and TC
ingress without leaving the old hook behind."""

from __future__ import annotations

import subprocess

from dataplane.lab import Lab
from loader import attach
from tests.conftest import require_root
from tests.netns.helpers import cli, cli_json, instance_name, leftovers, unload_if_present


def test_loopback_falls_back_to_generic_xdp_with_a_warning():
    require_root()
    instance = instance_name("lo")
    with Lab() as lab:
        ns = lab.ns("lo")
        try:
            out = cli("bpf", "attach", "lo", "--netns", ns, instance=instance)
            assert out.returncode == 0, out.stderr
            assert "native XDP not supported" in out.stderr and "generic" in out.stderr, out.stderr
            (att,) = cli_json("bpf", "status", instance=instance)["attachments"]
            assert att["xdp_mode"] == "generic" and all(att["present"].values()), att
            assert attach.xdp_query("lo", ns)[1] == "generic"
        finally:
            unload_if_present(instance)
        assert attach.xdp_query("lo", ns) == (0, "none")
    assert not leftovers(instance)


def test_switching_ingress_hook_removes_the_old_one():
    require_root()
    instance = instance_name("switch")
    with Lab() as lab:
        a, b = lab.ns("a"), lab.ns("b")
        _, ifname = lab.link(a, b, ["10.203.0.1/24"], ["10.203.0.2/24"])
        try:
            assert cli("bpf", "attach", ifname, "--netns", b, instance=instance).returncode == 0
            assert attach.xdp_query(ifname, b)[0] != 0

            out = cli("bpf", "attach", ifname, "--netns", b, "--ingress", "tc", instance=instance)
            assert out.returncode == 0, out.stderr
            assert attach.xdp_query(ifname, b) == (0, "none")
            assert [f["name"] for f in attach.tc_filters(ifname, b, "ingress")] == [f"dp:{instance}:tc_ingress"]

            out = cli("bpf", "attach", ifname, "--netns", b, "--ingress", "xdp", instance=instance)
            assert out.returncode == 0, out.stderr
            assert attach.xdp_query(ifname, b)[0] != 0
            assert attach.tc_filters(ifname, b, "ingress") == []

            assert cli("bpf", "detach", ifname, "--netns", b, instance=instance).returncode == 0
            assert attach.xdp_query(ifname, b) == (0, "none")
            qdiscs = subprocess.run(["tc", "-n", b, "qdisc", "show", "dev", ifname], capture_output=True,
                                    text=True).stdout
            assert "clsact" not in qdiscs
        finally:
            unload_if_present(instance)
    assert not leftovers(instance)
