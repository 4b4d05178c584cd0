"""Accounted traffic for the restart-during-flood test, run inside a namespace
with `ip netns exec NS python fault_traffic.py ...`. Standard library only.

  receive --udp PORT ... --tcp PORT ... --out FILE
      Prints "listening", then counts every datagram by (port, source,
      flow, sequence number) and every TCP connection by its first line:
      "r ID" (a request: answered "ok ID", then closed) or "s ID" (a stream
      of numbered 10-byte records, checked for order until EOF). On "stop"
      on stdin it writes a JSON summary to FILE and prints "done".

  send [--udp SRC:DST:PORT[:fresh] ...] [--flood SRC:DST:PORT] [--tcp-new SRC:DST:PORT]
       [--tcp-denied SRC:DST:PORT] [--stream SRC:DST:PORT --streams K] --out FILE
      Opens the K streams first, prints "started", then sends until "stop"
      on stdin: sequenced datagrams on each --udp flow at --udp-rate (a flow
      marked fresh uses a new source port per datagram, so each is a new
      flow), sequenced datagrams on --flood at --flood-rate, one new TCP
      request connection after another at --tcp-rate, connection attempts
      to --tcp-denied (each given --denied-wait seconds: one SYN, never
      retransmitted, so attempts == SYNs sent) and a record on every stream
      every --stream-interval. Then it half-closes the streams, waits for
      the receiver to close them, writes what it sent to FILE and prints
      "done".

  probe --from SRC ... --to DST:PORT --timeout S
      One TCP connection from each source address at once, each sending
      its address to an echo server and reading the echo until EOF;
      prints one JSON object {SRC: {"ok": bool, "error": str}}.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time

# Run as a script beside swap_traffic.py (its directory is on sys.path): the
# stdin/stdout protocol and the socket constants are that tool's.
from swap_traffic import (FRESH_BASE, FRESH_SPAN, SO_RCVBUFFORCE, TCP_INFO_TOTAL_RETRANS,
                          _endpoint, emit, wait_for_stop)

DATAGRAM = struct.Struct("!II")           # flow index, sequence number
RECORD_LEN = 10                           # b"m%08d\n"


def _readline(conn: socket.socket, limit: int = 64) -> bytes:
    out = b""
    while not out.endswith(b"\n") and len(out) < limit:
        b = conn.recv(1)
        if not b:
            break
        out += b
    return out


# --- receiver -----------------------------------------------------------------------

class Receiver:
    def __init__(self, udp_ports: list[int], tcp_ports: list[int]):
        self.lock = threading.Lock()
        self.udp: dict[str, list] = {}               # "port src flow" -> [seq, ...]
        self.requests: dict[int, list] = {p: [] for p in tcp_ports}
        self.streams: dict[int, dict] = {p: {} for p in tcp_ports}
        self.bad: list = []
        for port in udp_ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
            s.bind(("0.0.0.0", port))
            threading.Thread(target=self._udp, args=(s, port), daemon=True).start()
        for port in tcp_ports:
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("0.0.0.0", port))
            ls.listen(512)
            threading.Thread(target=self._accept, args=(ls, port), daemon=True).start()

    def _udp(self, s: socket.socket, port: int) -> None:
        while True:
            data, addr = s.recvfrom(2048)
            if len(data) < DATAGRAM.size:
                continue
            flow, seq = DATAGRAM.unpack_from(data)
            key = f"{port} {addr[0]} {flow}"
            with self.lock:
                self.udp.setdefault(key, []).append(seq)

    def _accept(self, ls: socket.socket, port: int) -> None:
        while True:
            conn, addr = ls.accept()
            threading.Thread(target=self._conn, args=(conn, addr, port), daemon=True).start()

    def _conn(self, conn: socket.socket, addr, port: int) -> None:
        with conn:
            try:
                conn.settimeout(120)
                head = _readline(conn).decode(errors="replace").split()
                if len(head) == 2 and head[0] == "r":
                    conn.sendall(f"ok {head[1]}\n".encode())
                    with self.lock:
                        self.requests[port].append([addr[0], int(head[1])])
                elif len(head) == 2 and head[0] == "s":
                    self._stream(conn, port, head[1], addr[0])
                else:
                    with self.lock:
                        self.bad.append([port, addr[0], " ".join(head)])
            except OSError as e:
                with self.lock:
                    self.bad.append([port, addr[0], f"error {e}"])

    def _stream(self, conn: socket.socket, port: int, sid: str, src: str) -> None:
        st = {"src": src, "records": 0, "in_order": True, "closed": False, "error": None, "first_bad": None}
        with self.lock:
            self.streams[port][sid] = st
        buf = b""
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    st["closed"] = True
                    return
                buf += data
                while len(buf) >= RECORD_LEN:
                    rec, buf = buf[:RECORD_LEN], buf[RECORD_LEN:]
                    if rec != b"m%08d\n" % st["records"] and st["in_order"]:
                        st["in_order"] = False
                        st["first_bad"] = [st["records"], rec.decode(errors="replace")]
                    st["records"] += 1
        except OSError as e:
            st["error"] = str(e)

    def summary(self) -> dict:
        with self.lock:
            return {"udp": {k: list(v) for k, v in self.udp.items()},
                    "requests": {str(p): list(v) for p, v in self.requests.items()},
                    "streams": {str(p): {k: dict(v) for k, v in s.items()} for p, s in self.streams.items()},
                    "bad": list(self.bad)}


def receive(args) -> int:
    r = Receiver(args.udp, args.tcp)
    emit("listening")
    wait_for_stop()
    with open(args.out, "w") as f:
        json.dump(r.summary(), f)
    emit("done")
    return 0


# --- sender -------------------------------------------------------------------------

class Paced:
    """Calls step() `rate` times a second in small bursts until stopped."""

    def __init__(self, rate: float, stop: threading.Event, burst_s: float = 0.005):
        self.rate, self.stop, self.burst_s = rate, stop, burst_s

    def run(self, step) -> None:
        t0 = time.monotonic()
        done = 0
        while not self.stop.is_set():
            due = int((time.monotonic() - t0) * self.rate)
            if due - done > self.rate * 0.1:       # far behind (descheduled): do not burst to catch up
                t0 = time.monotonic() - done / self.rate
                due = done + 1
            while done < due and not self.stop.is_set():
                step()
                done += 1
            time.sleep(self.burst_s)


class UdpFlow:
    def __init__(self, index: int, text: str):
        self.index = index
        self.src, self.dst, self.port = _endpoint(text)
        self.fresh = text.endswith(":fresh")
        self.sent = 0
        self.errors: list = []
        self.sock = None
        if not self.fresh:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((self.src, 0))
            self.sock.connect((self.dst, self.port))

    def step(self) -> None:
        data = DATAGRAM.pack(self.index, self.sent).ljust(32, b"\0")
        try:
            if self.fresh:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((self.src, FRESH_BASE + self.sent % FRESH_SPAN))
                    s.sendto(data, (self.dst, self.port))
            else:
                self.sock.send(data)
            self.sent += 1
        except OSError as e:
            self.errors.append([self.sent, str(e)])

    def report(self) -> dict:
        return {"index": self.index, "src": self.src, "dst": self.dst, "port": self.port, "fresh": self.fresh,
                "sent": self.sent, "errors": self.errors[:20], "error_count": len(self.errors)}


class TcpRequests:
    """One connection after another: connect, "r ID", read "ok ID", EOF."""

    def __init__(self, text: str, timeout: float):
        self.src, self.dst, self.port = _endpoint(text)
        self.timeout = timeout
        self.attempted = self.completed = 0
        self.failed: list = []
        self.slowest = 0.0

    def step(self) -> None:
        n = self.attempted
        self.attempted += 1
        t0 = time.monotonic()
        try:
            with socket.create_connection((self.dst, self.port), timeout=self.timeout,
                                          source_address=(self.src, 0)) as s:
                s.sendall(b"r %d\n" % n)
                reply = _readline(s)
                if reply != b"ok %d\n" % n:
                    raise OSError(f"reply {reply!r}")
                if s.recv(1) != b"":
                    raise OSError("no EOF after the reply")
            self.completed += 1
            self.slowest = max(self.slowest, time.monotonic() - t0)
        except OSError as e:
            self.failed.append([n, str(e)])

    def report(self) -> dict:
        return {"port": self.port, "attempted": self.attempted, "completed": self.completed,
                "failed": self.failed[:20], "failed_count": len(self.failed), "slowest_s": self.slowest}


class TcpDenied:
    """Connection attempts that must never be answered: each socket is
    closed after `wait` seconds, before TCP retransmits its SYN."""

    def __init__(self, text: str, wait: float):
        self.src, self.dst, self.port = _endpoint(text)
        self.wait = wait
        self.attempts = 0
        self.connected = 0
        self.other: list = []

    def step(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((self.src, 0))
            s.settimeout(self.wait)
            self.attempts += 1
            try:
                s.connect((self.dst, self.port))
                self.connected += 1
            except (socket.timeout, TimeoutError):
                pass
            except OSError as e:
                self.other.append(str(e))

    def report(self) -> dict:
        return {"port": self.port, "attempts": self.attempts, "connected": self.connected, "other": self.other[:20]}


class Stream:
    def __init__(self, sid: int, text: str, timeout: float):
        src, dst, port = _endpoint(text)
        self.sid = sid
        self.sock = socket.create_connection((dst, port), timeout=timeout, source_address=(src, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(b"s %d\n" % sid)
        self.local = "%s:%d" % self.sock.getsockname()[:2]
        self.records = 0
        self.error = None
        self.total_retrans = None
        self.closed_by_peer = False

    def step(self) -> None:
        if self.error is None:
            try:
                self.sock.sendall(b"m%08d\n" % self.records)
                self.records += 1
            except OSError as e:
                self.error = f"send: {e}"

    def finish(self) -> None:
        if self.error is None:
            try:
                info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
                self.total_retrans = struct.unpack_from("I", info, TCP_INFO_TOTAL_RETRANS)[0]
                self.sock.shutdown(socket.SHUT_WR)
                self.closed_by_peer = self.sock.recv(1) == b""
            except OSError as e:
                self.error = f"close: {e}"
        self.sock.close()

    def report(self) -> dict:
        return {"sid": self.sid, "local": self.local, "records": self.records, "error": self.error,
                "total_retrans": self.total_retrans, "closed_by_peer": self.closed_by_peer}


def send(args) -> int:
    stop = threading.Event()
    streams = [Stream(i, args.stream, args.timeout) for i in range(args.streams)] if args.stream else []
    udp = [UdpFlow(i, text) for i, text in enumerate(args.udp)]
    flood = UdpFlow(len(udp), args.flood) if args.flood else None
    requests = TcpRequests(args.tcp_new, args.timeout) if args.tcp_new else None
    denied = TcpDenied(args.tcp_denied, args.denied_wait) if args.tcp_denied else None

    def all_udp():
        for f in udp:
            f.step()

    def all_streams():
        for s in streams:
            s.step()

    jobs = []
    if udp:
        jobs.append((args.udp_rate, all_udp))
    if flood:
        jobs.append((args.flood_rate, flood.step))
    if requests:
        jobs.append((args.tcp_rate, requests.step))
    if denied:
        jobs.append((1.0 / args.denied_wait, denied.step))
    if streams:
        jobs.append((1.0 / args.stream_interval, all_streams))
    threads = [threading.Thread(target=Paced(rate, stop).run, args=(step,), daemon=True) for rate, step in jobs]
    for t in threads:
        t.start()
    emit("started")
    wait_for_stop()
    stop.set()
    for t in threads:
        t.join(timeout=args.timeout)
    for s in streams:
        s.finish()
    out = {"udp": [f.report() for f in udp], "flood": flood.report() if flood else None,
           "requests": requests.report() if requests else None, "denied": denied.report() if denied else None,
           "streams": [s.report() for s in streams], "stuck": [t.name for t in threads if t.is_alive()]}
    with open(args.out, "w") as f:
        json.dump(out, f)
    emit("done")
    return 0


# --- probe --------------------------------------------------------------------------

def _probe_one(src: str, dst: str, port: int, timeout: float) -> dict:
    try:
        with socket.create_connection((dst, port), timeout=timeout, source_address=(src, 0)) as s:
            s.sendall(src.encode())
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while True:
                data = s.recv(4096)
                if not data:
                    break
                reply += data
    except (socket.timeout, TimeoutError):
        return {"ok": False, "error": "timeout"}
    except OSError as e:
        return {"ok": False, "error": str(e)}
    if reply != src.encode():
        return {"ok": False, "error": f"reply {reply!r}"}
    return {"ok": True, "error": ""}


def probe(args) -> int:
    dst, port = args.to.rsplit(":", 1)
    results = {}

    def one(src):
        results[src] = _probe_one(src, dst, int(port), args.timeout)

    threads = [threading.Thread(target=one, args=(src,)) for src in args.sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    emit(json.dumps(results, sort_keys=True))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("receive")
    p.add_argument("--udp", type=int, action="append", default=[])
    p.add_argument("--tcp", type=int, action="append", default=[])
    p.add_argument("--out", required=True)
    p.set_defaults(func=receive)
    p = sub.add_parser("send")
    p.add_argument("--udp", action="append", default=[], help="SRC:DST:PORT[:fresh]")
    p.add_argument("--udp-rate", type=float, default=500.0, help="datagrams per second per --udp flow")
    p.add_argument("--flood", help="SRC:DST:PORT")
    p.add_argument("--flood-rate", type=float, default=20000.0)
    p.add_argument("--tcp-new", dest="tcp_new", help="SRC:DST:PORT")
    p.add_argument("--tcp-rate", type=float, default=100.0, help="new connections per second")
    p.add_argument("--tcp-denied", dest="tcp_denied", help="SRC:DST:PORT")
    p.add_argument("--denied-wait", type=float, default=0.25)
    p.add_argument("--stream", help="SRC:DST:PORT")
    p.add_argument("--streams", type=int, default=0)
    p.add_argument("--stream-interval", type=float, default=0.005)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=send)
    p = sub.add_parser("probe")
    p.add_argument("--from", dest="sources", action="append", required=True)
    p.add_argument("--to", required=True, help="DST:PORT")
    p.add_argument("--timeout", type=float, default=1.0)
    p.set_defaults(func=probe)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
