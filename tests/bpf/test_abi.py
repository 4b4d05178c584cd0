"""bpf/include/dp_abi.h against its Python mirror, loader/abi.py.

The header is compiled for the BPF target with debug info and the BTF the
compiler emits is the reference: every struct's size, every field's name,
byte offset and size, every enumerator's value and the #define constants
must match the ctypes mirror exactly.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from loader import abi, compile as bpfcompile, instance, tables
from tests.bpf.packets import LOCAL, REMOTE, TCP_P, endpoint_identities, expect, tcp_frame

HEADER = bpfcompile.BPF_DIR / "include" / "dp_abi.h"
MULTIARCH = f"/usr/include/{os.uname().machine}-linux-gnu"


def _clang(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["clang", "-target", "bpf", f"-I{HEADER.parent}", f"-I{MULTIARCH}", *args],
                          capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def abi_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("abi")


@pytest.fixture(scope="module")
def btf(abi_dir) -> dict:
    """BTF types of an object that references every mirrored struct and enum, by kind and name."""
    src = abi_dir / "abi_ref.c"
    lines = ["#include <linux/types.h>", '#include "dp_abi.h"', ""]
    lines += [f"struct {name} ref_struct_{name};" for name in abi.C_STRUCTS]
    lines += [f"enum {name} ref_enum_{name};" for name in abi.C_ENUMS]
    src.write_text("\n".join(lines) + "\n")
    obj = abi_dir / "abi_ref.o"
    cc = _clang("-g", "-O2", "-c", str(src), "-o", str(obj))
    assert cc.returncode == 0, f"compiling {HEADER} failed:\n{cc.stderr}"
    dump = subprocess.run(["bpftool", "btf", "dump", "file", str(obj), "-j"], capture_output=True, text=True,
                          check=False)
    assert dump.returncode == 0, f"bpftool btf dump failed:\n{dump.stderr}"
    types = json.loads(dump.stdout)["types"]
    return {"by_id": {t["id"]: t for t in types},
            "by_name": {(t["kind"], t["name"]): t for t in types if t.get("name") not in (None, "(anon)")}}


def _resolve(btf, type_id: int) -> dict:
    """Follows typedefs and qualifiers to the type that has a layout."""
    t = btf["by_id"][type_id]
    while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
        t = btf["by_id"][t["type_id"]]
    return t


def _size(btf, type_id: int) -> int:
    t = _resolve(btf, type_id)
    if t["kind"] == "ARRAY":
        return t["nr_elems"] * _size(btf, t["type_id"])
    return t["size"]


def _header_names(kind: str) -> set[str]:
    return set(re.findall(rf"^{kind}\s+(dp_\w+)\s*\{{", HEADER.read_text(), re.M))


def test_every_header_struct_and_enum_is_mirrored():
    assert _header_names("struct") == set(abi.C_STRUCTS)
    assert _header_names("enum") == set(abi.C_ENUMS)


@pytest.mark.parametrize("cname", sorted(abi.C_STRUCTS))
def test_struct_layout(btf, cname):
    py = abi.C_STRUCTS[cname]
    st = btf["by_name"].get(("STRUCT", cname))
    assert st is not None, f"struct {cname} not in the BTF of {HEADER.name}"
    assert st["size"] == ctypes.sizeof(py), f"struct {cname}: C size {st['size']}, Python {ctypes.sizeof(py)}"
    c_fields = [m["name"] for m in st["members"]]
    py_fields = [f[0] for f in py._fields_]
    assert c_fields == py_fields, f"struct {cname}: field names/order differ"
    for m in st["members"]:
        name = m["name"]
        desc = getattr(py, name)
        assert m["bits_offset"] % 8 == 0 and not m.get("bitfield_size"), f"{cname}.{name} is a bitfield"
        assert (m["bits_offset"] // 8, _size(btf, m["type_id"])) == (desc.offset, desc.size), \
            f"{cname}.{name}: C offset/size {(m['bits_offset'] // 8, _size(btf, m['type_id']))}, " \
            f"Python {(desc.offset, desc.size)}"
        # Arrays: same element count; nested structs: mirrored by their own class.
        c_type, py_type = _resolve(btf, m["type_id"]), dict(py._fields_)[name]
        if c_type["kind"] == "ARRAY":
            assert c_type["nr_elems"] == py_type._length_, f"{cname}.{name}: array length"
            c_type, py_type = _resolve(btf, c_type["type_id"]), py_type._type_
        if c_type["kind"] == "STRUCT":
            assert abi.C_STRUCTS.get(c_type["name"]) is py_type, \
                f"{cname}.{name}: struct {c_type['name']} mirrored by {py_type.__name__}"
        else:
            assert c_type["kind"] in ("INT", "ENUM"), f"{cname}.{name}: unexpected kind {c_type['kind']}"


# C enumerators the enum classes do not carry under prefix + member name.
ENUM_EXTRAS = {
    "DP_REASON_NONE": abi.Reason.NONE,
    "DP_REASON_FIRST_DROP": abi.REASON_FIRST_DROP,
    "DP_REASON_MAX": abi.REASON_MAX,
    "DP_STAT_MAX": abi.STAT_MAX,
}


@pytest.mark.parametrize("cname", sorted(abi.C_ENUMS))
def test_enum_values(btf, cname):
    py, prefix = abi.C_ENUMS[cname]
    en = btf["by_name"].get(("ENUM", cname)) or btf["by_name"].get(("ENUM64", cname))
    assert en is not None, f"enum {cname} not in the BTF of {HEADER.name}"
    c_values = {v["name"]: v["val"] for v in en["values"]}
    covered = set()
    for c_name, value in c_values.items():
        member = py.__members__.get(c_name[len(prefix):]) if c_name.startswith(prefix) else None
        if member is not None:
            assert int(member) == value, f"{c_name}: C {value}, Python {py.__name__}.{member.name} = {int(member)}"
            covered.add(member)
        else:
            assert c_name in ENUM_EXTRAS, f"{c_name} = {value} has no Python counterpart"
            assert int(ENUM_EXTRAS[c_name]) == value, f"{c_name}: C {value}, Python {int(ENUM_EXTRAS[c_name])}"
            if isinstance(ENUM_EXTRAS[c_name], py):
                covered.add(ENUM_EXTRAS[c_name])
    assert set(py) == covered, f"{py.__name__} members not in enum {cname}: {set(py) - covered}"


DEFINES = {
    "DP_ABI_VERSION": abi.ABI_VERSION,
    "DP_MAX_PLENS": abi.MAX_PLENS,
    "DP_MAX_RANGES": abi.MAX_RANGES,
    "DP_GEN_AUDIT_DEFAULT": abi.GEN_AUDIT_DEFAULT,
    "DP_CT_INIT_IS_A": abi.CT_INIT_IS_A,
    "DP_CT_INIT_EGRESS": abi.CT_INIT_EGRESS,
    "DP_CT_CLOSING": abi.CT_CLOSING,
    "DP_CT_SEEN_REPLY": abi.CT_SEEN_REPLY,
}


def test_defines(abi_dir):
    src = abi_dir / "defines.c"
    src.write_text('#include <linux/types.h>\n#include "dp_abi.h"\n')
    pp = _clang("-dM", "-E", str(src))
    assert pp.returncode == 0, pp.stderr
    found = {}
    for line in pp.stdout.splitlines():
        m = re.match(r"#define (DP_\w+) (.+)$", line)
        if m:
            found[m.group(1)] = m.group(2)
    header_defines = {n for n in found if n != "DP_ABI_H"}
    assert header_defines == set(DEFINES), "constants in dp_abi.h without a Python mirror or vice versa"
    for name, want in DEFINES.items():
        value = eval(re.sub(r"(\d+)[uUlL]+\b", r"\1", found[name]), {"__builtins__": {}})  # noqa: S307
        assert value == want, f"{name}: C {found[name]} = {value}, Python {want}"


def test_map_names_carry_the_abi_version():
    for spec in instance.MAP_SPECS:
        assert spec.pin.endswith(f"_v{abi.ABI_VERSION}"), spec.pin


def test_loaded_maps_have_the_mirrored_sizes(dp):
    for spec in instance.MAP_SPECS:
        if spec.key is None:
            continue
        m = dp.maps[spec.attr]
        assert (m.info.key_size, m.info.value_size) == (ctypes.sizeof(spec.key), ctypes.sizeof(spec.value)), spec.pin


@pytest.mark.parametrize("attr", ["ipcache", "plens", "policy", "ranges", "ct", "config", "reasons", "stats"])
def test_batch_reads_decode_like_single_lookups(dp, attr):
    """Map.items() reads values in batches; each must equal a lookup of its key,
    whatever the value size (dp_plens 804 bytes and dp_range_set 196 bytes are
    not multiples of 8)."""
    tables.sync_identities(dp, {**endpoint_identities(), "10.0.0.0/8": 500, "fd00::/16": 600})
    tables.sync_policy(dp, [tables.PolicyEntry(300, 400, 0, TCP_P, 1000, 2000, 1, 1),
                            tables.PolicyEntry(300, 400, 0, TCP_P, 3000, 4000, 3, 2),
                            tables.PolicyEntry(300, 500, 0, TCP_P, 5000, 6000, 1, 3),
                            tables.PolicyEntry(300, 400, 0, TCP_P, 80, 80, 1, 4)])
    for k in range(3):
        for fam in (4, 6):
            expect(dp, "xdp_ingress", tcp_frame(fam, REMOTE[fam], LOCAL[fam], 40000 + k, 80), abi.Reason.PASS_POLICY)
    dp.set_config(allow_sample=7)
    m = dp.maps[attr]
    items = list(m.items())
    assert len(items) >= (1 if attr == "config" else 2)
    for key, value in items:
        want = m.lookup(key)
        if m.percpu:
            assert [bytes(v) for v in value] == [bytes(v) for v in want], f"{m.name} key {key!r}"
        else:
            assert bytes(value) == bytes(want), f"{m.name} key {key!r}: batch read {value!r}, lookup {want!r}"
