"""BPF_PROG_TEST_RUN through libbpf's bpf_prog_test_run_opts.

The kernel runs the program `repeat` times on a copy of `data` and reports
the last return value and the mean duration per run. For tests and
benchmarks; the program's maps are the live ones.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os

from loader import libbpf
from loader.errors import DataplaneError

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
TC_ACT_UNSPEC = 0xFFFFFFFF  # -1 as the kernel's u32 retval
TC_ACT_OK = 0
TC_ACT_SHOT = 2


@dataclasses.dataclass
class RunResult:
    retval: int
    duration_ns: int  # mean per repetition
    data_out: bytes


def test_run(prog_fd: int, data: bytes, repeat: int = 1, ctx: bytes | None = None,
             out_size: int | None = None, flags: int = 0, cpu: int = 0) -> RunResult:
    if repeat < 1:
        raise DataplaneError("repeat must be at least 1")
    data_in = ctypes.create_string_buffer(bytes(data), len(data))
    out_len = out_size if out_size is not None else len(data) + 256
    data_out = ctypes.create_string_buffer(out_len)
    opts = libbpf.BpfTestRunOpts(sz=ctypes.sizeof(libbpf.BpfTestRunOpts))
    opts.data_in = ctypes.cast(data_in, ctypes.c_void_p)
    opts.data_size_in = len(data)
    opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
    opts.data_size_out = out_len
    opts.repeat = repeat
    opts.flags = flags
    opts.cpu = cpu
    ctx_buf = None
    if ctx is not None:
        ctx_buf = ctypes.create_string_buffer(bytes(ctx), len(ctx))
        opts.ctx_in = ctypes.cast(ctx_buf, ctypes.c_void_p)
        opts.ctx_size_in = len(ctx)
    ret = libbpf.lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if ret < 0:
        code = -ret if ret != -1 else ctypes.get_errno()
        raise DataplaneError(f"BPF_PROG_TEST_RUN failed: {os.strerror(code)}")
    return RunResult(retval=opts.retval, duration_ns=opts.duration,
                     data_out=data_out.raw[: opts.data_size_out])
