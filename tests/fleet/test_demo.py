"""`make demo` runs end to end and leaves nothing behind, in both modes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, require_root


def leftovers() -> list[str]:
    found = [f"/sys/fs/bpf/{n}" for n in os.listdir("/sys/fs/bpf") if n.startswith("demo-")]
    if os.path.isdir("/run/dataplane"):
        found += [f"/run/dataplane/{n}" for n in os.listdir("/run/dataplane") if n.startswith("demo-")]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [line.split()[0] for line in netns.splitlines() if line.startswith("dpdemo")]
    return found


@pytest.mark.parametrize("mode", [[], ["--standalone"]], ids=["fleet", "standalone"])
def test_demo_runs_and_cleans_up(mode):
    require_root()
    assert not leftovers(), f"left by something else before the demo: {leftovers()}"
    out = subprocess.run([sys.executable, "-m", "dataplane.demo", *mode], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "all checks held" in out.stdout
    assert "FAIL" not in out.stdout
    assert "Traceback" not in out.stderr
    assert not leftovers(), leftovers()
