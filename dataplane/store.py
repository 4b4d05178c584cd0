"""Where the controller keeps its state: an embedded SQLite file by default,
etcd for several controllers.

Both are key-value stores with one compare-and-swap commit: a commit names
the revision it was computed from and fails if another commit came first.
State keys (the controller's records) change only through commit; status
keys (what agents last reported) are plain writes that any controller may
make. etcd adds leadership (a key held by a lease) and a watch, so that
followers see the leader's commits.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

from loader.errors import DataplaneError

log = logging.getLogger("dataplane.store")

META = "meta"


class StoreError(DataplaneError):
    pass


class Store:
    """Interface. Keys are relative paths like "policy/3"; values are JSON text."""

    name = "store"

    def load(self) -> tuple[dict, int]:
        """All state keys and values, and the committed revision (0: empty)."""
        raise NotImplementedError

    def commit(self, expected: int, revision: int, puts: dict, deletes: list) -> bool:
        """Writes puts/deletes and meta.revision = revision if the committed
        revision is still `expected`; False if another commit came first."""
        raise NotImplementedError

    def put_status(self, key: str, value: str) -> None:
        raise NotImplementedError

    def put_status_many(self, items: dict) -> None:
        """Several status records at once (one transaction where the store has them)."""
        for k, v in items.items():
            self.put_status(k, v)

    def load_status(self) -> dict:
        raise NotImplementedError

    def watch(self, on_change: Callable[[], None]) -> None:
        """Calls on_change after commits made elsewhere (no-op for embedded stores)."""

    def campaign(self, name: str, on_change: Callable[[bool], None]) -> None:
        """Takes part in leader election; on_change(is_leader) on every change.
        Embedded stores have one controller: it leads at once."""
        on_change(True)

    def leader(self) -> str:
        return ""

    def close(self) -> None:
        pass


class SqliteStore(Store):
    """One file, one controller. Commits are transactions."""

    def __init__(self, path: str):
        self.path = path
        self.name = f"sqlite://{path}"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS status (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the store {path}: {e}") from None

    def _revision(self) -> int:
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (META,)).fetchone()
        return json.loads(row[0])["revision"] if row else 0

    def load(self) -> tuple[dict, int]:
        with self._lock:
            rows = dict(self._db.execute("SELECT key, value FROM state").fetchall())
        meta = json.loads(rows.get(META, '{"revision": 0}'))
        return rows, meta["revision"]

    def commit(self, expected: int, revision: int, puts: dict, deletes: list) -> bool:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                if self._revision() != expected:
                    self._db.execute("ROLLBACK")
                    return False
                for k in deletes:
                    self._db.execute("DELETE FROM state WHERE key = ?", (k,))
                for k, v in puts.items():
                    self._db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (k, v))
                meta = json.loads(puts.get(META) or "{}")
                meta["revision"] = revision
                self._db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (META, json.dumps(meta)))
                self._db.execute("COMMIT")
                return True
            except sqlite3.Error as e:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise StoreError(f"store {self.path}: {e}") from None

    def put_status(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO status (key, value) VALUES (?, ?)", (key, value))

    def put_status_many(self, items: dict) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO status (key, value) VALUES (?, ?)", items.items())
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise StoreError(f"store {self.path}: {e}") from None

    def load_status(self) -> dict:
        with self._lock:
            return dict(self._db.execute("SELECT key, value FROM status").fetchall())

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


class EtcdStore(Store):
    """State in etcd (through its HTTP gateway, with etcd3gw), shared by
    several controllers; one of them leads (holds the leader key's lease)
    and alone commits. If etcd cannot be reached the leader steps down, so
    writes stop, while every controller keeps serving agents what it has."""

    LEASE_TTL = 3

    def __init__(self, endpoints: list[tuple[str, int]], prefix: str = "/zt-dataplane/", timeout: float = 3.0):
        from etcd3gw.client import Etcd3Client

        self.endpoints = endpoints
        self.prefix = prefix
        self.name = "etcd://" + ",".join(f"{h}:{p}" for h, p in endpoints)
        self.timeout = timeout
        self._clients = [Etcd3Client(host=h, port=p, timeout=timeout) for h, p in endpoints]
        self._current = 0
        self._stop = threading.Event()
        self._meta_mod = 0
        self._leader = False
        # Fail at start if no endpoint answers: a clear error, not a hang.
        self._call(lambda c: c.status())

    def _call(self, fn):
        errors = []
        for i in range(len(self._clients)):
            idx = (self._current + i) % len(self._clients)
            try:
                result = fn(self._clients[idx])
                self._current = idx
                return result
            except Exception as e:  # requests and etcd3gw errors alike
                errors.append(f"{self.endpoints[idx][0]}:{self.endpoints[idx][1]}: {type(e).__name__}")
        raise StoreError(f"etcd unreachable ({'; '.join(errors)})")

    def _key(self, k: str) -> str:
        return self.prefix + "state/" + k

    def load(self) -> tuple[dict, int]:
        items = self._call(lambda c: c.get_prefix(self.prefix + "state/"))
        rows = {}
        meta_mod = 0
        for value, meta in items:
            key = meta["key"].decode() if isinstance(meta["key"], bytes) else meta["key"]
            k = key[len(self.prefix + "state/"):]
            rows[k] = value.decode() if isinstance(value, bytes) else value
            if k == META:
                meta_mod = int(meta.get("mod_revision", 0))
        self._meta_mod = meta_mod
        return rows, json.loads(rows.get(META, '{"revision": 0}'))["revision"]

    def commit(self, expected: int, revision: int, puts: dict, deletes: list) -> bool:
        rows, current = self.load()
        if current != expected:
            return False
        meta = json.loads(puts.get(META) or rows.get(META) or "{}")
        meta["revision"] = revision
        puts = {**puts, META: json.dumps(meta)}
        compare = ({"key": _b64(self._key(META)), "result": "EQUAL", "target": "MOD",
                    "mod_revision": str(self._meta_mod)} if self._meta_mod else
                   {"key": _b64(self._key(META)), "result": "EQUAL", "target": "CREATE", "create_revision": "0"})
        success = [{"request_delete_range": {"key": _b64(self._key(k))}} for k in deletes]
        success += [{"request_put": {"key": _b64(self._key(k)), "value": _b64(v)}} for k, v in puts.items()]
        txn = {"compare": [compare], "success": success, "failure": []}
        result = self._call(lambda c: c.transaction(txn))
        return bool(result.get("succeeded"))

    def put_status(self, key: str, value: str) -> None:
        self._call(lambda c: c.put(self.prefix + "status/" + key, value))

    def load_status(self) -> dict:
        items = self._call(lambda c: c.get_prefix(self.prefix + "status/"))
        out = {}
        for value, meta in items:
            key = meta["key"].decode() if isinstance(meta["key"], bytes) else meta["key"]
            out[key[len(self.prefix + "status/"):]] = value.decode() if isinstance(value, bytes) else value
        return out

    POLL_S = 0.2

    def watch(self, on_change: Callable[[], None]) -> None:
        """Polls the meta key (one small read) and calls on_change when the
        committed revision moves. A streaming watch would be lighter, but
        etcd3gw's never ends when its connection drops, and a follower that
        silently stops following would keep serving revoked sessions."""
        def run():
            seen = None
            failing = False
            while not self._stop.wait(self.POLL_S):
                try:
                    value = self._call(lambda c: c.get(self._key(META)))
                    if failing:
                        log.info("etcd reachable again")
                        failing = False
                    if value != seen:
                        seen = value
                        on_change()
                except StoreError as e:
                    if not failing:
                        log.warning("cannot follow commits: %s", e)
                        failing = True
                except Exception as e:  # noqa: BLE001 - a reload failing must not end following
                    log.warning("reload after a commit failed: %s", e)

        threading.Thread(target=run, name="etcd-follow", daemon=True).start()

    def campaign(self, name: str, on_change: Callable[[bool], None]) -> None:
        key = self.prefix + "leader"

        def run():
            lease = None
            while not self._stop.is_set():
                try:
                    if self._leader:
                        lease.refresh()
                        holder = self._call(lambda c: c.get(key))
                        if not holder or (holder[0].decode() if isinstance(holder[0], bytes) else holder[0]) != name:
                            raise StoreError("lost the leader key")
                    else:
                        lease = self._call(lambda c: c.lease(ttl=self.LEASE_TTL))
                        if self._call(lambda c: c.create(key, name, lease=lease)):
                            self._leader = True
                            log.info("%s leads (etcd lease %s)", name, lease.id)
                            on_change(True)
                        else:
                            lease.revoke()
                except Exception as e:  # noqa: BLE001 - any failure: not the leader any more
                    if self._leader:
                        log.warning("%s steps down: %s", name, e)
                        self._leader = False
                        on_change(False)
                self._stop.wait(self.LEASE_TTL / 3)

        threading.Thread(target=run, name="etcd-campaign", daemon=True).start()

    def leader(self) -> str:
        """The leader's name, "" when there is none; StoreError when etcd is unreachable."""
        holder = self._call(lambda c: c.get(self.prefix + "leader"))
        return (holder[0].decode() if isinstance(holder[0], bytes) else holder[0]) if holder else ""

    def close(self) -> None:
        self._stop.set()


def open_store(url: str) -> Store:
    """sqlite:///path/to/file.db, or etcd://host:port[,host:port...]."""
    if url.startswith("sqlite://"):
        return SqliteStore(url[len("sqlite://"):])
    if url.startswith("etcd://"):
        endpoints = []
        for part in url[len("etcd://"):].split(","):
            host, _, port = part.rpartition(":")
            try:
                endpoints.append((host.strip("[]") or "127.0.0.1", int(port)))
            except ValueError:
                raise StoreError(f"bad etcd endpoint {part!r} (want host:port)") from None
        return EtcdStore(endpoints)
    raise StoreError(f"unknown store {url!r}: use sqlite:///PATH or etcd://HOST:PORT[,HOST:PORT]")


def retry_until(fn, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)
