"""Tiny traffic tools run inside lab namespaces: servers that answer, clients
that report what happened as one JSON line. Used by the demo.

  python -m dataplane.probe serve-tcp ADDR PORT...     echo server(s), forever
  python -m dataplane.probe serve-udp ADDR PORT...
  python -m dataplane.probe tcp SRC DST PORT [TIMEOUT]  connect, send, read echo
  python -m dataplane.probe udp SRC DST PORT [TIMEOUT]
  python -m dataplane.probe stream SRC DST PORT         send a line every 5 ms, print send times
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import threading
import time


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def serve_tcp(addr: str, ports: list[int]) -> None:
    def one(port: int):
        srv = socket.socket(_family(addr), socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((addr, port))
        srv.listen(64)
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    for p in ports:
        threading.Thread(target=one, args=(p,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


def _echo(conn: socket.socket) -> None:
    with conn:
        while True:
            data = conn.recv(4096)
            if not data:
                return
            conn.sendall(data)


def serve_udp(addr: str, ports: list[int]) -> None:
    sel = selectors.DefaultSelector()
    for p in ports:
        s = socket.socket(_family(addr), socket.SOCK_DGRAM)
        s.bind((addr, p))
        sel.register(s, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            data, peer = key.fileobj.recvfrom(4096)
            key.fileobj.sendto(data, peer)


def tcp(src: str, dst: str, port: int, timeout: float) -> dict:
    t0 = time.monotonic()
    s = socket.socket(_family(dst), socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((src, 0))
    try:
        s.connect((dst, port))
        s.sendall(b"hello")
        ok = s.recv(16) == b"hello"
        return {"ok": ok, "ms": round((time.monotonic() - t0) * 1000, 2)}
    except OSError as e:
        return {"ok": False, "error": type(e).__name__ if isinstance(e, TimeoutError) else str(e)}
    finally:
        s.close()


def udp(src: str, dst: str, port: int, timeout: float) -> dict:
    s = socket.socket(_family(dst), socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.bind((src, 0))
    try:
        s.sendto(b"ping", (dst, port))
        data, _ = s.recvfrom(16)
        return {"ok": data == b"ping"}
    except OSError as e:
        return {"ok": False, "error": "timeout" if isinstance(e, TimeoutError) else str(e)}
    finally:
        s.close()


def stream(src: str, dst: str, port: int) -> None:
    """Sends a numbered line every 5 ms; prints each echo's arrival time
    (monotonic seconds) until the connection stalls for 2 s."""
    s = socket.socket(_family(dst), socket.SOCK_STREAM)
    s.bind((src, 0))
    s.connect((dst, port))
    s.settimeout(0.005)
    print("connected", flush=True)
    n, last_echo, buf = 0, time.monotonic(), b""
    while time.monotonic() - last_echo < 2.0:
        try:
            s.send(b"%d\n" % n)
        except (BlockingIOError, socket.timeout):
            pass
        n += 1
        try:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                last_echo = time.monotonic()
                print(f"echo {line.decode()} {last_echo:.6f}", flush=True)
        except (BlockingIOError, socket.timeout):
            pass
    print(f"stalled {last_echo:.6f}", flush=True)


def main(argv: list[str]) -> int:
    cmd, *rest = argv
    if cmd == "serve-tcp":
        serve_tcp(rest[0], [int(p) for p in rest[1:]])
    elif cmd == "serve-udp":
        serve_udp(rest[0], [int(p) for p in rest[1:]])
    elif cmd in ("tcp", "udp"):
        timeout = float(rest[3]) if len(rest) > 3 else 1.0
        fn = tcp if cmd == "tcp" else udp
        print(json.dumps(fn(rest[0], rest[1], int(rest[2]), timeout)), flush=True)
    elif cmd == "stream":
        stream(rest[0], rest[1], int(rest[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
