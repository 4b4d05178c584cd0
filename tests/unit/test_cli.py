"""CLI behaviour that needs no kernel objects."""

import pytest

from dataplane import cli
from loader import instance


def test_unknown_map_name_is_a_one_line_error(capsys):
    assert cli.main(["bpf", "map", "dump", "nonsense"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dataplane: error: unknown map 'nonsense'")
    assert err.count("\n") == 1


def test_missing_privileges_are_named(monkeypatch, capsys):
    monkeypatch.setattr(instance, "_capabilities", lambda: 0)
    assert cli.main(["bpf", "status"]) == 77
    err = capsys.readouterr().err
    assert "needs root" in err and "CAP_NET_ADMIN" in err and "Traceback" not in err


def test_invalid_instance_name(capsys):
    assert cli.main(["--instance", "../x", "bpf", "unload"]) != 0
    assert "invalid instance name" in capsys.readouterr().err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        cli.main(["bpf", "attach"])
    assert e.value.code == 2
