"""Traffic endpoints for the netns tests, run inside a namespace with
`ip netns exec NS python peer.py ...`. Standard library only.

Every line printed is one event, flushed at once, so the test can follow
what happened while the process runs:

  serve        listening
               accept tcp PORT PEER
               recv tcp|udp PORT PEER MONOTONIC_NS NBYTES
  tcp-request  one JSON object: {"ok": bool, "reply": str, "error": str}
  udp-request  same
  tcp-stream   connected LOCAL_PORT, then error ... if the connection fails

Timestamps are CLOCK_MONOTONIC, which network namespaces share, so the
test process can compare them with its own clock. MONOTONIC_NS is taken
when recv() returns, so it is never earlier than the data's arrival.

Servers bind the IPv6 wildcard with IPV6_V6ONLY off, so one socket per port
serves both families (IPv4 peers appear as ::ffff:a.b.c.d).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

_print_lock = threading.Lock()


def emit(*fields) -> None:
    with _print_lock:
        sys.stdout.write(" ".join(str(f) for f in fields) + "\n")
        sys.stdout.flush()


def _peer(addr) -> str:
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:"):
        host = host[len("::ffff:"):]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _dual_stack(kind: int, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    return s


# --- servers ------------------------------------------------------------------

def _tcp_conn(conn: socket.socket, port: int, peer: str, mode: str) -> None:
    with conn:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            now = time.monotonic_ns()
            if not data:
                return
            emit("recv", "tcp", port, peer, now, len(data))
            if mode == "echo":
                try:
                    conn.sendall(data)
                except OSError:
                    return


def _tcp_listener(sock: socket.socket, port: int, mode: str) -> None:
    while True:
        conn, addr = sock.accept()
        peer = _peer(addr)
        emit("accept", "tcp", port, peer)
        threading.Thread(target=_tcp_conn, args=(conn, port, peer, mode), daemon=True).start()


def _udp_listener(sock: socket.socket, port: int, mode: str) -> None:
    while True:
        data, addr = sock.recvfrom(65536)
        emit("recv", "udp", port, _peer(addr), time.monotonic_ns(), len(data))
        if mode == "echo":
            sock.sendto(b"echo:" + data, addr)


def serve(args) -> int:
    threads = []
    for spec in args.listen:
        proto, port, mode = spec.split(":")
        port = int(port)
        if mode not in ("echo", "sink"):
            raise SystemExit(f"unknown mode {mode!r}")
        if proto == "tcp":
            sock = _dual_stack(socket.SOCK_STREAM, port)
            sock.listen(64)
            target = _tcp_listener
        elif proto == "udp":
            sock = _dual_stack(socket.SOCK_DGRAM, port)
            target = _udp_listener
        else:
            raise SystemExit(f"unknown protocol {proto!r}")
        threads.append(threading.Thread(target=target, args=(sock, port, mode), daemon=True))
    for t in threads:
        t.start()
    emit("listening")
    while True:
        time.sleep(3600)


# --- clients ------------------------------------------------------------------

def _result(ok: bool, reply: bytes = b"", error: str = "") -> int:
    emit(json.dumps({"ok": ok, "reply": reply.decode(errors="replace"), "error": error}))
    return 0 if ok else 1


def tcp_request(args) -> int:
    """Connects, sends the payload, half-closes, reads the echo until EOF."""
    try:
        sock = socket.create_connection((args.addr, args.port), timeout=args.timeout)
    except (socket.timeout, TimeoutError):
        return _result(False, error="timeout")
    except ConnectionRefusedError:
        return _result(False, error="refused")
    except OSError as e:
        return _result(False, error=f"connect: {e}")
    reply = b""
    try:
        with sock:
            sock.sendall(args.payload.encode())
            sock.shutdown(socket.SHUT_WR)
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
    except (socket.timeout, TimeoutError):
        return _result(False, reply, "timeout after connect")
    except OSError as e:
        return _result(False, reply, f"exchange: {e}")
    return _result(True, reply)


def udp_request(args) -> int:
    family = socket.AF_INET6 if ":" in args.addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(args.timeout)
        sock.connect((args.addr, args.port))
        sock.send(args.payload.encode())
        try:
            reply = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return _result(False, error="timeout")
        except OSError as e:
            return _result(False, error=f"recv: {e}")
    return _result(True, reply)


def tcp_stream(args) -> int:
    """Sends a small numbered message every interval until the process is killed."""
    sock = socket.create_connection((args.addr, args.port), timeout=args.timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    emit("connected", sock.getsockname()[1])
    seq = 0
    try:
        while True:
            sock.sendall(b"m%08d\n" % seq)
            seq += 1
            time.sleep(args.interval)
    except OSError as e:
        emit("error", seq, e)
        return 1


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--listen", action="append", required=True, help="tcp|udp:PORT:echo|sink")
    p.set_defaults(func=serve)
    for name, func in (("tcp-request", tcp_request), ("udp-request", udp_request)):
        p = sub.add_parser(name)
        p.add_argument("addr")
        p.add_argument("port", type=int)
        p.add_argument("--payload", default="ping")
        p.add_argument("--timeout", type=float, default=10.0)
        p.set_defaults(func=func)
    p = sub.add_parser("tcp-stream")
    p.add_argument("addr")
    p.add_argument("port", type=int)
    p.add_argument("--interval", type=float, default=0.005)
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=tcp_stream)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
