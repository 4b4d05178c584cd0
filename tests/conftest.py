"""Shared fixtures. Tiers: tests/unit (no kernel objects), tests/bpf
(programs loaded, packets through BPF_PROG_TEST_RUN), tests/netns (real
traffic between namespaces), tests/fleet (controllers and several agents). Kernel tiers need root; without it they fail
loudly rather than skip, so a green run always means the kernel was tested."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = pathlib.Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        if tier in ("unit", "bpf", "netns", "fleet"):
            item.add_marker(getattr(pytest.mark, tier))


def require_root():
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root (CAP_BPF, CAP_NET_ADMIN); run `make test` as root", pytrace=False)
