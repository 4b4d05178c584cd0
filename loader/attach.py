"""Attach and detach programs: XDP through libbpf's netlink calls, TC through
a clsact qdisc and a direct-action cls_bpf filter (pyroute2).

Both kinds of attachment belong to the interface, not to a process: they
outlive the loader, which is what lets enforcement survive a restart.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import socket
import subprocess

from loader import libbpf
from loader.errors import ForeignProgramError, InterfaceError
from loader.netns import in_netns

log = logging.getLogger("dataplane.loader")

TC_PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
TC_DEFAULT_PREF = 0xDA
TC_HANDLE = 1

XDP_MODE_NAMES = {
    libbpf.XDP_ATTACHED_NONE: "none",
    libbpf.XDP_ATTACHED_DRV: "native",
    libbpf.XDP_ATTACHED_SKB: "generic",
    libbpf.XDP_ATTACHED_HW: "offload",
    libbpf.XDP_ATTACHED_MULTI: "multi",
}


def ifindex_of(ifname: str, netns: str | None) -> int:
    with in_netns(netns):
        try:
            return socket.if_nametoindex(ifname)
        except OSError:
            where = f" in network namespace {netns!r}" if netns else ""
            raise InterfaceError(f"interface {ifname!r} not found{where}") from None


# --- XDP -------------------------------------------------------------------

def xdp_query(ifname: str, netns: str | None) -> tuple[int, str]:
    """(program id, mode) of the XDP program on the interface; (0, 'none') if none."""
    ifindex = ifindex_of(ifname, netns)
    opts = libbpf.BpfXdpQueryOpts(sz=ctypes.sizeof(libbpf.BpfXdpQueryOpts))
    with in_netns(netns):
        ret = libbpf.lib().bpf_xdp_query(ifindex, 0, ctypes.byref(opts))
    if ret < 0:
        raise InterfaceError(f"cannot query XDP on {ifname}: {os.strerror(-ret)}")
    mode = XDP_MODE_NAMES.get(opts.attach_mode, str(opts.attach_mode))
    prog_id = opts.prog_id or opts.drv_prog_id or opts.skb_prog_id or opts.hw_prog_id
    return prog_id, mode


def _mode_flag(mode: str) -> int:
    return {"native": libbpf.XDP_FLAGS_DRV_MODE, "generic": libbpf.XDP_FLAGS_SKB_MODE}[mode]


def xdp_attach(ifname: str, netns: str | None, prog_fd: int, mode: str, ours: set[int],
               force: bool = False) -> str:
    """Attach prog_fd; mode 'auto' tries native and falls back to generic with
    a warning. A program already there is replaced atomically if it is one of
    ours (or force), refused otherwise. Returns the mode in effect."""
    ifindex = ifindex_of(ifname, netns)
    current_id, current_mode = xdp_query(ifname, netns)
    lb = libbpf.lib()

    if current_id and current_id not in ours and not force:
        raise ForeignProgramError(
            f"{ifname} already carries XDP program id {current_id} ({_prog_name(current_id)}) that this "
            f"instance did not load; detach it first or pass --force")

    if current_id:
        want = current_mode if mode == "auto" else mode
        if want == current_mode and current_mode in ("native", "generic"):
            old_fd = libbpf.prog_fd_by_id(current_id)
            try:
                opts = libbpf.BpfXdpAttachOpts(sz=ctypes.sizeof(libbpf.BpfXdpAttachOpts), old_prog_fd=old_fd)
                with in_netns(netns):
                    ret = lb.bpf_xdp_attach(ifindex, prog_fd, _mode_flag(want) | libbpf.XDP_FLAGS_REPLACE,
                                            ctypes.byref(opts))
            finally:
                os.close(old_fd)
            if ret < 0:
                raise InterfaceError(f"cannot replace XDP program on {ifname}: {os.strerror(-ret)}")
            return want
        xdp_detach(ifname, netns, current_id)

    modes = ["native", "generic"] if mode == "auto" else [mode]
    last_err = 0
    for m in modes:
        with in_netns(netns):
            ret = lb.bpf_xdp_attach(ifindex, prog_fd, _mode_flag(m) | libbpf.XDP_FLAGS_UPDATE_IF_NOEXIST, None)
        if ret == 0:
            if m == "generic" and mode == "auto":
                log.warning("%s: native XDP not supported (%s); attached in generic (skb) mode, "
                            "which is slower", ifname, os.strerror(last_err))
            return m
        last_err = -ret
        if last_err == errno.EBUSY or last_err == errno.EEXIST:
            break
    raise InterfaceError(f"cannot attach XDP to {ifname}: {os.strerror(last_err)}")


def xdp_detach(ifname: str, netns: str | None, expected_id: int) -> bool:
    """Removes the XDP program if it is still expected_id; False if another is there."""
    ifindex = ifindex_of(ifname, netns)
    current_id, current_mode = xdp_query(ifname, netns)
    if not current_id:
        return True
    if current_id != expected_id:
        return False
    flags = _mode_flag(current_mode) if current_mode in ("native", "generic") else 0
    old_fd = libbpf.prog_fd_by_id(current_id)
    try:
        opts = libbpf.BpfXdpAttachOpts(sz=ctypes.sizeof(libbpf.BpfXdpAttachOpts), old_prog_fd=old_fd)
        with in_netns(netns):
            ret = libbpf.lib().bpf_xdp_attach(ifindex, -1, flags | libbpf.XDP_FLAGS_REPLACE, ctypes.byref(opts))
    finally:
        os.close(old_fd)
    if ret < 0 and -ret != errno.EEXIST:
        raise InterfaceError(f"cannot detach XDP from {ifname}: {os.strerror(-ret)}")
    return ret == 0


def _prog_name(prog_id: int) -> str:
    try:
        fd = libbpf.prog_fd_by_id(prog_id)
    except OSError:
        return "unknown"
    try:
        return libbpf.prog_info(fd).name.decode() or "unnamed"
    finally:
        os.close(fd)


# --- TC (clsact + cls_bpf) -----------------------------------------------------

def _ipr(netns: str | None):
    """A netlink socket in the namespace. It is opened from inside the
    namespace (setns of this thread) rather than with pyroute2's netns
    option, which forks a helper: forking a multi-threaded process can
    deadlock the child."""
    from pyroute2 import IPRoute

    with in_netns(netns):
        return IPRoute()


def tc_filters(ifname: str, netns: str | None, direction: str, kinds: tuple = ("bpf",)) -> list[dict]:
    """Filters of the given kinds (None: all) on a clsact hook; bpf ones with
    their program ids (from `tc -j`, as pyroute2 does not decode them)."""
    ifindex_of(ifname, netns)
    cmd = ["tc"] + (["-n", netns] if netns else []) + ["-j", "filter", "show", "dev", ifname, direction]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    found = []
    for f in json.loads(out.stdout):
        opts = f.get("options")
        if not opts or (kinds is not None and f.get("kind") not in kinds):
            continue
        found.append({"pref": f.get("pref"), "handle": int(str(opts.get("handle", "0")), 0),
                      "name": opts.get("bpf_name", ""), "prog_id": opts.get("prog", {}).get("id", 0)})
    return found


def tc_attach(ifname: str, netns: str | None, direction: str, prog_fd: int, name: str,
              pref: int = TC_DEFAULT_PREF, force: bool = False) -> None:
    """Adds or atomically replaces our filter (pref, handle 1) on clsact."""
    ifindex = ifindex_of(ifname, netns)
    for f in tc_filters(ifname, netns, direction):
        if f["pref"] == pref and f["handle"] == TC_HANDLE and not f["name"].startswith("dp:") and not force:
            raise ForeignProgramError(
                f"{ifname} {direction}: tc filter pref {pref} handle {TC_HANDLE} belongs to another program "
                f"({f['name'] or 'unnamed'}, id {f['prog_id']}); pass --force or choose another --tc-pref")
    with _ipr(netns) as ipr:
        try:
            ipr.tc("add", "clsact", ifindex)
        except Exception as e:  # NetlinkError EEXIST: clsact already there
            if getattr(e, "code", None) != errno.EEXIST:
                raise InterfaceError(f"cannot add clsact qdisc on {ifname}: {e}") from None
        try:
            ipr.tc("replace-filter", "bpf", ifindex, handle=TC_HANDLE, fd=prog_fd, name=name,
                   parent=TC_PARENTS[direction], prio=pref, classid=1, direct_action=True)
        except Exception as e:
            raise InterfaceError(f"cannot attach tc {direction} filter on {ifname}: {e}") from None


def tc_detach(ifname: str, netns: str | None, direction: str, pref: int = TC_DEFAULT_PREF) -> bool:
    """Removes our filter; removes clsact too when nothing else is left on it."""
    try:
        ifindex = ifindex_of(ifname, netns)
    except InterfaceError:
        return False
    ours = [f for f in tc_filters(ifname, netns, direction)
            if f["pref"] == pref and f["handle"] == TC_HANDLE and f["name"].startswith("dp:")]
    if not ours:
        return False
    with _ipr(netns) as ipr:
        try:
            ipr.tc("del-filter", "bpf", ifindex, handle=TC_HANDLE, parent=TC_PARENTS[direction], prio=pref)
        except Exception as e:
            raise InterfaceError(f"cannot remove tc {direction} filter from {ifname}: {e}") from None
        if not any(tc_filters(ifname, netns, d, kinds=None) for d in TC_PARENTS):
            try:
                ipr.tc("del", "clsact", ifindex)
            except Exception:
                pass
    return True
