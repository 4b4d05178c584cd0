"""Sequenced traffic for the policy-swap test, run inside a namespace with
`ip netns exec NS python swap_traffic.py ...`. Standard library only.

  receive --udp PORT ... --tcp PORT --out FILE
      Prints "listening", then records every datagram (sequence number,
      send time, arrival time, sender) and reads one TCP connection's
      stream of fixed-size numbered records, checking their order. On
      "stop" (or EOF) on stdin it writes a JSON summary to FILE and
      prints "done".

  send --flow SRC:DST:PORT[:fresh] ... --rate PPS [--tcp SRC:DST:PORT --tcp-interval S] --out FILE
      Prints "started" once the TCP connection is up, then sends one
      datagram per flow every 1/PPS seconds, each carrying its flow index,
      sequence number and CLOCK_MONOTONIC send time (a flow marked fresh
      sends each datagram from a new source port), and a TCP record every
      interval. On "stop" on stdin it finishes the TCP stream (half-close,
      then waits for the receiver to close), writes what it sent to FILE
      and prints "done".

CLOCK_MONOTONIC is shared by network namespaces, so the test compares
these times with its own.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time

DATAGRAM = struct.Struct("!IIQ")      # flow index, sequence number, send time (ns)
RECORD_LEN = 10                       # b"t%08d\n"
TCP_INFO_TOTAL_RETRANS = 100          # offset of tcpi_total_retrans in struct tcp_info
FRESH_BASE, FRESH_SPAN = 10000, 20000   # below the ephemeral range the other sockets draw from
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)   # Linux; the module does not always name it


def emit(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def wait_for_stop() -> None:
    for line in sys.stdin:
        if line.strip() == "stop":
            return


# --- receiver -----------------------------------------------------------------

class Receiver:
    def __init__(self, udp_ports: list[int], tcp_port: int | None):
        self.lock = threading.Lock()
        self.udp = {p: [] for p in udp_ports}           # port -> [(src, flow, seq, send_ns, recv_ns)]
        self.tcp = {"accepted": 0, "bytes": 0, "records": 0, "in_order": True, "closed": False, "error": None,
                    "peer": None, "first_bad": None}
        self.socks = []
        for port in udp_ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
            s.bind(("0.0.0.0", port))
            self.socks.append(s)
            threading.Thread(target=self._udp, args=(s, port), daemon=True).start()
        if tcp_port is not None:
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("0.0.0.0", tcp_port))
            ls.listen(4)
            self.socks.append(ls)
            threading.Thread(target=self._tcp, args=(ls,), daemon=True).start()

    def _udp(self, s: socket.socket, port: int) -> None:
        sink = self.udp[port]
        while True:
            data, addr = s.recvfrom(2048)
            now = time.monotonic_ns()
            if len(data) >= DATAGRAM.size:
                flow, seq, sent = DATAGRAM.unpack_from(data)
                with self.lock:
                    sink.append((addr[0], flow, seq, sent, now))

    def _tcp(self, ls: socket.socket) -> None:
        conn, addr = ls.accept()
        t = self.tcp
        t["accepted"] += 1
        t["peer"] = f"{addr[0]}:{addr[1]}"
        buf = b""
        expected = 0
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    t["closed"] = True
                    break
                t["bytes"] += len(data)
                buf += data
                while len(buf) >= RECORD_LEN:
                    rec, buf = buf[:RECORD_LEN], buf[RECORD_LEN:]
                    if rec != b"t%08d\n" % expected and t["in_order"]:
                        t["in_order"] = False
                        t["first_bad"] = [expected, rec.decode(errors="replace")]
                    expected += 1
                    t["records"] = expected
        except OSError as e:
            t["error"] = str(e)
        finally:
            conn.close()

    def summary(self) -> dict:
        with self.lock:
            return {"udp": {str(p): list(v) for p, v in self.udp.items()}, "tcp": dict(self.tcp)}


def receive(args) -> int:
    r = Receiver(args.udp, args.tcp)
    emit("listening")
    wait_for_stop()
    with open(args.out, "w") as f:
        json.dump(r.summary(), f)
    emit("done")
    return 0


# --- sender -------------------------------------------------------------------

def _endpoint(text: str) -> tuple[str, str, int]:
    src, dst, port = text.split(":")[:3]
    return src, dst, int(port)


class _FreshPorts:
    """Sends each datagram from a source port of its own (FRESH_BASE up, in
    turn), so that every datagram is the first packet of a new flow."""

    def __init__(self, src: str, dst: str, port: int):
        self.src, self.dst, self.port = src, dst, port
        self.count = 0

    def send(self, data: bytes) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.src, FRESH_BASE + self.count % FRESH_SPAN))
            self.count += 1
            s.sendto(data, (self.dst, self.port))

    def getsockname(self):
        return (self.src, 0)


def send(args) -> int:
    flows = [_endpoint(f) for f in args.flow]
    socks = []
    for text, (src, dst, port) in zip(args.flow, flows):
        if text.endswith(":fresh"):
            socks.append(_FreshPorts(src, dst, port))
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, 0))
        s.connect((dst, port))
        socks.append(s)
    sent = [[] for _ in flows]                      # send times, index = sequence number
    errors = [[] for _ in flows]
    stop = threading.Event()
    tcp = {"records": 0, "error": None, "local": None, "total_retrans": None, "closed_by_peer": False}

    tcp_sock = None
    if args.tcp:
        src, dst, port = _endpoint(args.tcp)
        tcp_sock = socket.create_connection((dst, port), timeout=args.timeout, source_address=(src, 0))
        tcp_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tcp_sock.settimeout(args.timeout)
        tcp["local"] = "%s:%d" % tcp_sock.getsockname()[:2]

    def tcp_loop():
        try:
            while not stop.is_set():
                tcp_sock.sendall(b"t%08d\n" % tcp["records"])
                tcp["records"] += 1
                time.sleep(args.tcp_interval)
        except OSError as e:
            tcp["error"] = f"send: {e}"

    def udp_loop():
        period = 1.0 / args.rate
        t0 = time.monotonic()
        tick = 0
        while not stop.is_set():
            for i, s in enumerate(socks):
                seq = len(sent[i])
                now = time.monotonic_ns()
                try:
                    s.send(DATAGRAM.pack(i, seq, now).ljust(args.size, b"\0"))
                    sent[i].append(now)
                except OSError as e:
                    errors[i].append([seq, str(e)])
            tick += 1
            delay = t0 + tick * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.05:                     # far behind: do not burst to catch up
                t0, tick = time.monotonic(), 0

    threads = [threading.Thread(target=udp_loop, daemon=True)]
    if tcp_sock is not None:
        threads.append(threading.Thread(target=tcp_loop, daemon=True))
    for t in threads:
        t.start()
    emit("started")
    wait_for_stop()
    stop.set()
    for t in threads:
        t.join(timeout=args.timeout)

    if tcp_sock is not None and tcp["error"] is None:
        try:
            info = tcp_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            tcp["total_retrans"] = struct.unpack_from("I", info, TCP_INFO_TOTAL_RETRANS)[0]
            tcp_sock.shutdown(socket.SHUT_WR)
            tcp["closed_by_peer"] = tcp_sock.recv(1) == b""
        except OSError as e:
            tcp["error"] = f"close: {e}"
    if tcp_sock is not None:
        tcp_sock.close()
    out = {"flows": [{"src": src, "dst": dst, "port": port, "local_port": s.getsockname()[1], "sent": sent[i],
                      "errors": errors[i]} for i, ((src, dst, port), s) in enumerate(zip(flows, socks))],
           "tcp": tcp}
    with open(args.out, "w") as f:
        json.dump(out, f)
    emit("done")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("receive")
    p.add_argument("--udp", type=int, action="append", default=[])
    p.add_argument("--tcp", type=int)
    p.add_argument("--out", required=True)
    p.set_defaults(func=receive)
    p = sub.add_parser("send")
    p.add_argument("--flow", action="append", required=True, help="SRC:DST:PORT[:fresh] (IPv4)")
    p.add_argument("--rate", type=float, default=500.0, help="datagrams per second per flow")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--tcp", help="SRC:DST:PORT")
    p.add_argument("--tcp-interval", type=float, default=0.005)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=send)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
