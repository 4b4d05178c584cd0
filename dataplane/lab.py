"""Network namespaces joined by veth, for the demo and the tests.

Everything a Lab creates is removed by close() (or leaving the `with`
block), including processes started in its namespaces, even when the code
inside fails. Traffic stays inside the namespaces it creates.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time

from loader.errors import DataplaneError


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise DataplaneError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


class Lab:
    _counter = itertools.count()

    def __init__(self, prefix: str | None = None):
        # Short, unique names: interface names are limited to 15 characters.
        self.prefix = prefix or f"dp{os.getpid() % 100000}{next(self._counter)}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self._links = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def ns(self, name: str) -> str:
        """Creates namespace <prefix>-<name> with loopback up; returns its name."""
        full = f"{self.prefix}-{name}"
        _ip("netns", "add", full)
        self.namespaces.append(full)
        _ip("-n", full, "link", "set", "lo", "up")
        return full

    def link(self, ns_a: str, ns_b: str, addrs_a: list[str], addrs_b: list[str]) -> tuple[str, str]:
        """A veth pair between two namespaces, up, with the given addresses
        (CIDR notation; IPv6 ones skip duplicate address detection)."""
        self._links += 1
        if_a, if_b = f"{self.prefix}a{self._links}", f"{self.prefix}b{self._links}"
        _ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        for ns, ifname, addrs in ((ns_a, if_a, addrs_a), (ns_b, if_b, addrs_b)):
            for addr in addrs:
                extra = ["nodad"] if ":" in addr else []
                _ip("-n", ns, "addr", "add", addr, "dev", ifname, *extra)
            _ip("-n", ns, "link", "set", ifname, "up")
        return if_a, if_b

    def switch(self, name: str = "fabric") -> str:
        """A namespace holding a bridge, br0: an L2 segment for plug()."""
        ns = self.ns(name)
        _ip("-n", ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", ns, "link", "set", "br0", "up")
        return ns

    def plug(self, switch_ns: str, ns: str, addrs: list[str]) -> str:
        """A veth from namespace ns into the switch's bridge; returns the
        interface name inside ns."""
        self._links += 1
        inner, outer = f"{self.prefix}p{self._links}", f"{self.prefix}s{self._links}"
        _ip("link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", switch_ns)
        _ip("-n", switch_ns, "link", "set", outer, "master", "br0")
        _ip("-n", switch_ns, "link", "set", outer, "up")
        for addr in addrs:
            extra = ["nodad"] if ":" in addr else []
            _ip("-n", ns, "addr", "add", addr, "dev", inner, *extra)
        _ip("-n", ns, "link", "set", inner, "up")
        return inner

    def run(self, ns: str, cmd: list[str], timeout: float = 30, check: bool = False,
            **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                              timeout=timeout, check=check, **kw)

    def popen(self, ns: str, cmd: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream:
                    stream.close()
        self.procs.clear()
        for ns in reversed(self.namespaces):
            # Killing what still runs inside lets the namespace go at once.
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    """Polls predicate until it returns a truthy value or timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
