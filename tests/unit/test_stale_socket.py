"""Datapath.unload removes the socket an agent killed with SIGKILL left
behind, so nothing of the instance stays under /run/dataplane; a socket an
agent still listens on is left alone."""

from __future__ import annotations

import socket

from loader.instance import _remove_stale_socket


def test_stale_socket_removed_live_one_kept(tmp_path):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()                                   # the file stays, nobody listens
    assert stale.exists()
    _remove_stale_socket(str(stale))
    assert not stale.exists()

    live = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(live))
        server.listen(1)
        _remove_stale_socket(str(live))
        assert live.exists()
    _remove_stale_socket(str(tmp_path / "absent.sock"))     # nothing there: nothing to do
