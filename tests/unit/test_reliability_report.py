"""scripts/reliability_report.py: figures in, the document's block out,
the prose around it untouched, nothing invented for a missing record."""

from __future__ import annotations

import json

import pytest

from scripts import reliability_report as rr
from tests import reliability


def test_records_render_into_the_block(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAPLANE_RELIABILITY_DIR", str(tmp_path / "figs"))
    reliability.record("packet_fuzz", {"frames": 1200, "runs": 3600, "mismatches": 0, "false_passes": 0,
                                       "reasons": {"PASS_POLICY": 7}})
    records = rr.load(tmp_path / "figs")
    assert records["packet_fuzz"]["figures"]["frames"] == 1200
    block = rr.render(records, {"date": "2026-01-01", "git": {"commit": "abc"}, "cpu_model": "x", "vcpus": 2,
                                "kernel": "6.1"})
    assert "| frames fuzzed (each through all three programs) | 1,200 |" in block
    assert "| policy documents tried | not recorded |" in block
    assert "PASS_POLICY 7" in block

    doc = tmp_path / "reliability.md"
    doc.write_text(f"# Title\nprose\n{rr.BEGIN}\nold\n{rr.END}\nmore prose\n")
    rr.write(doc, block)
    text = doc.read_text()
    assert text.startswith("# Title\nprose\n") and text.endswith("more prose\n")
    assert "old" not in text and "1,200" in text


def test_missing_markers_and_directory_fail(tmp_path, capsys):
    doc = tmp_path / "d.md"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        rr.write(doc, "x")
    assert rr.main([str(tmp_path / "nope")]) == 2
    assert "make soak" in capsys.readouterr().err


def test_size_knob(monkeypatch):
    monkeypatch.delenv("DATAPLANE_X", raising=False)
    assert reliability.size("DATAPLANE_X", 5) == 5
    monkeypatch.setenv("DATAPLANE_X", "1_000_000")
    assert reliability.size("DATAPLANE_X", 5) == 1000000
    for bad in ("many", "0"):
        monkeypatch.setenv("DATAPLANE_X", bad)
        with pytest.raises(ValueError, match="DATAPLANE_X"):
            reliability.size("DATAPLANE_X", 5)


def test_record_without_directory_only_prints(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("DATAPLANE_RELIABILITY_DIR", raising=False)
    reliability.record("x", {"a": 1})
    assert json.loads(capsys.readouterr().out.split(": ", 1)[1]) == {"a": 1}
