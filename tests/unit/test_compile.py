"""Building the translation unit and the cflags (no kernel)."""

import pytest

from loader import compile as bpfcompile
from loader.compile import BuildOptions
from loader.errors import CompileError, DataplaneError


def test_project_headers_are_inlined_once_with_line_markers(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "a.h").write_text('#include "b.h"\nint a;\n')
    (tmp_path / "lib" / "b.h").write_text("int b;\n")
    (tmp_path / "entry.c").write_text('#include "lib/a.h"\n#include "lib/b.h"\n#include <linux/bpf.h>\nint main_fn;\n')
    tu = bpfcompile.translation_unit(tmp_path / "entry.c", [tmp_path])
    assert tu.count("int b;") == 1
    assert f'#line 1 "{tmp_path / "lib" / "a.h"}"' in tu
    assert f'#line 2 "{tmp_path / "entry.c"}"' in tu
    assert "#include <linux/bpf.h>" in tu  # system headers are bcc's business
    assert tu.index("int b;") < tu.index("int a;") < tu.index("int main_fn;")


def test_missing_project_header_names_file_and_line(tmp_path):
    (tmp_path / "entry.c").write_text('int x;\n#include "nope.h"\n')
    with pytest.raises(CompileError, match=r"entry.c:2: included file 'nope.h' not found"):
        bpfcompile.translation_unit(tmp_path / "entry.c", [tmp_path])


def test_options_become_defines():
    flags = BuildOptions(pin_dir="/sys/fs/bpf/x", ct_max=1024, identity="lpm",
                         extra_defines=(("DP_BENCH_KEYS", "1024"),)).cflags()
    assert '-DDP_PIN_DIR="/sys/fs/bpf/x"' in flags
    assert "-DDP_CT_MAX=1024" in flags
    assert "-DDP_IDENTITY_LPM=1" in flags and "-DDP_IDENTITY_HASH=1" not in flags
    assert "-DDP_BENCH_KEYS=1024" in flags


@pytest.mark.parametrize("kw", [{"identity": "trie"}, {"ct_max": 0}, {"events_bytes": 3 * 4096}])
def test_bad_options_are_refused(kw):
    with pytest.raises(DataplaneError):
        BuildOptions(pin_dir="/sys/fs/bpf/x", **kw)


def test_every_program_source_exists():
    for spec in bpfcompile.PROGRAMS.values():
        source = bpfcompile.BPF_DIR / spec.source
        assert source.is_file()
        assert f"int {spec.function}(" in source.read_text()
