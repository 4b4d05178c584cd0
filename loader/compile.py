"""Compile the BPF entry files with bcc and load them into the kernel.

Options reach the C code only as -D cflags (BuildOptions.cflags); the C text
is never edited. bcc rewrites map calls (`map.lookup(&k)`) only in the main
file of a module, so the entry file and the project headers it includes are
joined into one translation unit first, with #line markers so that compiler
errors and verifier line info still name the real file and line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
from pathlib import Path

from loader.errors import CompileError, DataplaneError, VerifierError

BPF_DIR = Path(os.environ.get("DATAPLANE_BPF_DIR", Path(__file__).resolve().parents[1] / "bpf"))

# Values of enum bpf_prog_type, as bcc.BPF.XDP / BPF.SCHED_CLS.
PROG_TYPE_SCHED_CLS = 3
PROG_TYPE_XDP = 6


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    hook: str
    source: str
    function: str
    prog_type: int


PROGRAMS = {
    "xdp_ingress": ProgramSpec("xdp_ingress", "xdp_ingress.c", "dp_xdp_ingress", PROG_TYPE_XDP),
    "tc_ingress": ProgramSpec("tc_ingress", "tc_ingress.c", "dp_tc_ingress", PROG_TYPE_SCHED_CLS),
    "tc_egress": ProgramSpec("tc_egress", "tc_egress.c", "dp_tc_egress", PROG_TYPE_SCHED_CLS),
}


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Everything that shapes a load. Map capacities must match existing pins."""

    pin_dir: str
    ipcache_max: int = 262144   # both generations: half is usable
    policy_max: int = 262144
    ranges_max: int = 4096
    ct_max: int = 262144
    frag_max: int = 8192
    rules_max: int = 65536
    events_bytes: int = 256 * 1024
    identity: str = "hash"  # "hash" (per-prefix-length hash probes) or "lpm" (one LPM trie)
    allow_non_ip: bool = True
    extra_defines: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.identity not in ("hash", "lpm"):
            raise DataplaneError(f"identity structure must be 'hash' or 'lpm', not {self.identity!r}")
        for name in ("ipcache_max", "policy_max", "ranges_max", "ct_max", "frag_max", "rules_max"):
            if getattr(self, name) < 1:
                raise DataplaneError(f"{name} must be at least 1")
        pages = self.events_bytes // 4096
        if self.events_bytes % 4096 or pages & (pages - 1):
            raise DataplaneError("events ring size must be a power-of-two number of 4 KiB pages")

    def cflags(self) -> list[str]:
        defines = {
            "DP_PIN_DIR": f'"{self.pin_dir}"',
            "DP_IPCACHE_MAX": self.ipcache_max,
            "DP_POLICY_MAX": self.policy_max,
            "DP_RANGES_MAX": self.ranges_max,
            "DP_CT_MAX": self.ct_max,
            "DP_FRAG_MAX": self.frag_max,
            "DP_RULES_MAX": self.rules_max,
            "DP_EVENTS_BYTES": self.events_bytes,
            "DP_ALLOW_NON_IP": int(self.allow_non_ip),
            "DP_IDENTITY_LPM" if self.identity == "lpm" else "DP_IDENTITY_HASH": 1,
        }
        defines.update(dict(self.extra_defines))
        return [f"-D{k}={v}" for k, v in defines.items()]


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def translation_unit(entry: Path, include_dirs: list[Path]) -> str:
    """The entry file with every project header it includes (by "...") inlined once."""
    seen: set[Path] = set()

    def expand(path: Path) -> list[str]:
        path = path.resolve()
        if path in seen:
            return []
        seen.add(path)
        out = [f'#line 1 "{path}"\n']
        for lineno, line in enumerate(path.read_text().splitlines(keepends=True), 1):
            m = _INCLUDE.match(line)
            if not m:
                out.append(line)
                continue
            for base in [path.parent, *include_dirs]:
                candidate = base / m.group(1)
                if candidate.is_file():
                    out.extend(expand(candidate))
                    out.append(f'#line {lineno + 1} "{path}"\n')
                    break
            else:
                raise CompileError(f"{path}:{lineno}: included file {m.group(1)!r} not found")
        return out

    return "".join(expand(entry))


@contextlib.contextmanager
def captured_stderr():
    """Collects what C code (clang inside bcc, bcc's verifier-log printer)
    writes to file descriptor 2, which Python's sys.stderr cannot see."""
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        box = {"text": ""}
        try:
            yield box
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box["text"] = tmp.read().decode(errors="replace")


def kernel_headers_present() -> str | None:
    """None when bcc can find kernel headers, else the one-line reason."""
    release = os.uname().release
    build = Path(f"/lib/modules/{release}/build")
    if not (build / "include").is_dir():
        return (f"kernel headers missing: {build} does not lead to a header tree "
                f"(run `make setup`, which installs linux-headers and links them)")
    return None


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error:" in line:
            return line.strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "unknown error"


def verifier_tail(log: str, lines: int = 12) -> str:
    kept = [ln for ln in log.splitlines() if ln.strip() and not ln.startswith("HINT")]
    return "\n".join(kept[-lines:])


@dataclasses.dataclass
class LoadedProgram:
    spec: ProgramSpec
    fd: int
    module: object  # the bcc.BPF object; keeps map fds open until pinned


def compile_module(spec: ProgramSpec, options: BuildOptions, bpf_dir: Path | None = None):
    """Compile one entry file; bcc opens or creates and pins its maps here."""
    from bcc import BPF  # imported late: only loads need bcc

    bpf_dir = Path(bpf_dir or BPF_DIR)
    missing = kernel_headers_present()
    if missing:
        raise CompileError(missing)
    text = translation_unit(bpf_dir / spec.source, [bpf_dir, bpf_dir / "include"])
    with captured_stderr() as err:
        try:
            module = BPF(text=text.encode(), cflags=options.cflags())
        except Exception:
            module = None
    if module is None:
        raise CompileError(f"compiling {spec.source} failed: {_first_error(err['text'])}")
    return module


def load(spec: ProgramSpec, module) -> int:
    """Load a compiled program; returns its fd. Raises VerifierError with the log tail."""
    import ctypes

    from bcc import libbcc

    lib = libbcc.lib
    name = spec.function.encode()
    start = lib.bpf_function_start(module.module, name)
    if not start:
        raise CompileError(f"{spec.source} defines no function {spec.function}")

    def attempt(log_level: int, log_size: int):
        buf = ctypes.create_string_buffer(log_size) if log_size else None
        with captured_stderr() as err:
            fd = lib.bcc_func_load(module.module, spec.prog_type, name, start,
                                   lib.bpf_function_size(module.module, name),
                                   lib.bpf_module_license(module.module),
                                   lib.bpf_module_kern_version(module.module),
                                   log_level, buf, log_size, None, -1)
            errno_ = ctypes.get_errno()
        log = (buf.value.decode(errors="replace") if buf is not None else "") + err["text"]
        return fd, errno_, log

    fd, errno_, _ = attempt(0, 0)
    if fd >= 0:
        return fd
    # Load again with a verifier log; the kernel keeps the tail if it overflows.
    _, _, log = attempt(1, 16 << 20)
    raise VerifierError(
        f"the kernel verifier rejected {spec.function} ({os.strerror(errno_) if errno_ else 'error'}); "
        "last lines of its log:\n" + verifier_tail(log), log)
