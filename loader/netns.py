"""Run a block of code inside a named network namespace (/run/netns/NAME).

setns(2) switches only the calling thread, so netlink sockets opened inside
the block (libbpf's XDP calls) talk to that namespace while bpffs, a mount,
stays the host's. This is why the loader takes --netns instead of running
under `ip netns exec`, which remounts /sys and hides /sys/fs/bpf.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

from loader.errors import InterfaceError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(name: str) -> str:
    if "/" in name or name in ("", ".", ".."):
        raise InterfaceError(f"invalid network namespace name {name!r}")
    return os.path.join(NETNS_RUN_DIR, name)


@contextlib.contextmanager
def in_netns(name: str | None):
    if not name:
        yield
        return
    path = netns_path(name)
    try:
        target = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise InterfaceError(f"network namespace {name!r} does not exist ({path})") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)
