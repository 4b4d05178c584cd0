"""Typed access to a BPF map by file descriptor, through libbpf.

A Map knows its key and value ctypes types; per-CPU maps return one value
per possible CPU. Batch operations are used where the kernel has them.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Iterable, Iterator

from loader import libbpf
from loader.errors import MapError


def _round8(n: int) -> int:
    return (n + 7) & ~7


class Map:
    def __init__(self, fd: int, key_type, value_type, name: str = ""):
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        info = libbpf.map_info(fd)
        self.info = info
        self.name = name or info.name.decode()
        self.map_type = info.type
        self.max_entries = info.max_entries
        self.percpu = info.type in libbpf.PERCPU_MAP_TYPES
        self.ncpus = libbpf.num_possible_cpus() if self.percpu else 1
        if key_type is not None and info.key_size != ctypes.sizeof(key_type):
            raise MapError(f"map {self.name}: key is {info.key_size} bytes, expected "
                           f"{ctypes.sizeof(key_type)} ({key_type.__name__})")
        if value_type is not None and info.value_size != ctypes.sizeof(value_type):
            raise MapError(f"map {self.name}: value is {info.value_size} bytes, expected "
                           f"{ctypes.sizeof(value_type)} ({value_type.__name__})")
        # Per-CPU values are laid out one per CPU, each rounded up to 8 bytes;
        # batch reads of other maps pack values at their exact size.
        self._stride = _round8(info.value_size)
        self._batch_stride = self._stride * self.ncpus if self.percpu else info.value_size

    @classmethod
    def open_pinned(cls, path: str, key_type, value_type, name: str = "") -> "Map":
        try:
            fd = libbpf.obj_get(path)
        except OSError as e:
            raise MapError(f"cannot open pinned map {path}: {e.strerror}") from None
        try:
            return cls(fd, key_type, value_type, name)
        except Exception:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # --- single elements ---------------------------------------------------

    def _value_buffer(self):
        return ctypes.create_string_buffer(self._stride * self.ncpus)

    def _decode_value(self, buf):
        if not self.percpu:
            return self.value_type.from_buffer_copy(buf.raw[: ctypes.sizeof(self.value_type)])
        size = ctypes.sizeof(self.value_type)
        return [self.value_type.from_buffer_copy(buf.raw[i * self._stride: i * self._stride + size])
                for i in range(self.ncpus)]

    def lookup(self, key):
        key = self._key(key)
        buf = self._value_buffer()
        ret = libbpf.lib().bpf_map_lookup_elem(self.fd, ctypes.byref(key), buf)
        if ret < 0:
            code = -ret if ret != -1 else ctypes.get_errno()
            if code == errno.ENOENT:
                return None
            raise MapError(f"map {self.name}: lookup failed: {os.strerror(code)}")
        return self._decode_value(buf)

    def update(self, key, value, flags: int = libbpf.BPF_ANY) -> None:
        key = self._key(key)
        buf = self._encode_value(value)
        ret = libbpf.lib().bpf_map_update_elem(self.fd, ctypes.byref(key), buf, flags)
        if ret < 0:
            code = -ret if ret != -1 else ctypes.get_errno()
            raise MapError(self._update_error(code))

    def delete(self, key) -> bool:
        key = self._key(key)
        ret = libbpf.lib().bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if ret < 0:
            code = -ret if ret != -1 else ctypes.get_errno()
            if code == errno.ENOENT:
                return False
            raise MapError(f"map {self.name}: delete failed: {os.strerror(code)}")
        return True

    def _update_error(self, code: int) -> str:
        if code == errno.E2BIG:
            return f"map {self.name} is full ({self.max_entries} entries)"
        return f"map {self.name}: update failed: {os.strerror(code)}"

    def _key(self, key):
        if isinstance(key, int) and self.key_type is ctypes.c_uint32:
            return ctypes.c_uint32(key)
        return key

    def _encode_value(self, value):
        if not self.percpu:
            return ctypes.byref(value)
        values = value if isinstance(value, (list, tuple)) else [value] * self.ncpus
        buf = ctypes.create_string_buffer(self._stride * self.ncpus)
        for i, v in enumerate(values):
            ctypes.memmove(ctypes.addressof(buf) + i * self._stride, ctypes.byref(v), ctypes.sizeof(v))
        return buf

    # --- iteration ---------------------------------------------------------

    def keys(self) -> Iterator:
        lb = libbpf.lib()
        cur = None
        nxt = self.key_type()
        while True:
            ret = lb.bpf_map_get_next_key(self.fd, ctypes.byref(cur) if cur is not None else None,
                                          ctypes.byref(nxt))
            if ret < 0:
                return
            yield self.key_type.from_buffer_copy(nxt)
            cur = self.key_type.from_buffer_copy(nxt)

    def items(self, batch: int = 4096) -> Iterator[tuple]:
        """All entries; uses BPF_MAP_LOOKUP_BATCH where the map type has it."""
        if self.map_type in (libbpf.BPF_MAP_TYPE_LPM_TRIE,):
            for k in self.keys():
                v = self.lookup(k)
                if v is not None:
                    yield k, v
            return
        yield from self._items_batch(batch)

    def _items_batch(self, batch: int):
        lb = libbpf.lib()
        ksize = ctypes.sizeof(self.key_type)
        vsize = ctypes.sizeof(self.value_type)
        keys = ctypes.create_string_buffer(ksize * batch)
        values = ctypes.create_string_buffer(self._batch_stride * batch)
        in_batch = None
        out_batch = ctypes.create_string_buffer(max(ksize, 8))
        while True:
            count = ctypes.c_uint32(batch)
            ret = lb.bpf_map_lookup_batch(self.fd, in_batch, out_batch, keys, values,
                                          ctypes.byref(count), None)
            err = 0
            if ret < 0:
                err = -ret if ret != -1 else ctypes.get_errno()
                if err != errno.ENOENT and count.value == 0:
                    raise MapError(f"map {self.name}: batch lookup failed: {os.strerror(err)}")
            raw_keys, raw_values = keys.raw, values.raw
            for i in range(count.value):
                k = self.key_type.from_buffer_copy(raw_keys[i * ksize:(i + 1) * ksize])
                base = i * self._batch_stride
                if self.percpu:
                    v = [self.value_type.from_buffer_copy(
                        raw_values[base + c * self._stride: base + c * self._stride + vsize])
                        for c in range(self.ncpus)]
                else:
                    v = self.value_type.from_buffer_copy(raw_values[base: base + vsize])
                yield k, v
            if err == errno.ENOENT:
                return
            in_batch = ctypes.create_string_buffer(out_batch.raw)

    def count(self) -> int:
        """Number of entries; batched, so a million-entry map takes a fraction of a second."""
        if self.map_type in (libbpf.BPF_MAP_TYPE_ARRAY, libbpf.BPF_MAP_TYPE_PERCPU_ARRAY):
            return self.max_entries
        if self.map_type == libbpf.BPF_MAP_TYPE_LPM_TRIE:
            return sum(1 for _ in self.keys())
        lb = libbpf.lib()
        batch = 8192
        keys = ctypes.create_string_buffer(ctypes.sizeof(self.key_type) * batch)
        values = ctypes.create_string_buffer(self._batch_stride * batch)
        token = ctypes.create_string_buffer(max(ctypes.sizeof(self.key_type), 8))
        in_batch, total = None, 0
        while True:
            n = ctypes.c_uint32(batch)
            ret = lb.bpf_map_lookup_batch(self.fd, in_batch, token, keys, values, ctypes.byref(n), None)
            total += n.value
            if ret < 0:
                err = -ret if ret != -1 else ctypes.get_errno()
                if err == errno.ENOENT:
                    return total
                raise MapError(f"map {self.name}: batch lookup failed: {os.strerror(err)}")
            in_batch = ctypes.create_string_buffer(token.raw)

    # --- batches -----------------------------------------------------------

    def update_batch(self, pairs: Iterable[tuple], flags: int = libbpf.BPF_ANY, chunk: int = 65536) -> int:
        """Writes all pairs; returns how many. Stops at the first failure
        with MapError naming the map (entries before it stay written)."""
        lb = libbpf.lib()
        vsize = self._stride * self.ncpus if self.percpu else ctypes.sizeof(self.value_type)
        opts = libbpf.BpfMapBatchOpts(sz=ctypes.sizeof(libbpf.BpfMapBatchOpts), elem_flags=flags, flags=0)
        total = 0
        pairs = list(pairs)
        for start in range(0, len(pairs), chunk):
            part = pairs[start:start + chunk]
            keys = b"".join(bytes(self._key(k)) for k, _ in part)
            if self.percpu:
                values = b"".join(ctypes.string_at(self._encode_value(v), vsize) for _, v in part)
            else:
                values = b"".join(bytes(v) for _, v in part)
            count = ctypes.c_uint32(len(part))
            ret = lb.bpf_map_update_batch(self.fd, keys, values, ctypes.byref(count), ctypes.byref(opts))
            if ret < 0:
                code = -ret if ret != -1 else ctypes.get_errno()
                if code == errno.EINVAL and self.map_type == libbpf.BPF_MAP_TYPE_LPM_TRIE:
                    for k, v in part:  # LPM tries have no batch ops
                        self.update(k, v, flags)
                    total += len(part)
                    continue
                raise MapError(self._update_error(code) + f" after {total + count.value} of {len(pairs)}")
            total += count.value
        return total

    def delete_batch(self, keys: Iterable, chunk: int = 65536) -> int:
        lb = libbpf.lib()
        keys = list(keys)
        total = 0
        for start in range(0, len(keys), chunk):
            part = keys[start:start + chunk]
            buf = b"".join(bytes(self._key(k)) for k in part)
            count = ctypes.c_uint32(len(part))
            ret = lb.bpf_map_delete_batch(self.fd, buf, ctypes.byref(count), None)
            if ret < 0:
                code = -ret if ret != -1 else ctypes.get_errno()
                if code == errno.EINVAL and self.map_type == libbpf.BPF_MAP_TYPE_LPM_TRIE:
                    total += sum(self.delete(k) for k in part)
                    continue
                if code != errno.ENOENT:
                    raise MapError(f"map {self.name}: batch delete failed: {os.strerror(code)}")
                # ENOENT: a key was already gone; delete the rest one by one.
                total += count.value + sum(self.delete(k) for k in part[count.value + 1:])
                continue
            total += count.value
        return total

    def clear(self) -> int:
        return self.delete_batch(list(self.keys()))
