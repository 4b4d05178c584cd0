"""A datapath instance: programs and maps pinned under /sys/fs/bpf/<instance>/,
its attachments recorded in /run/dataplane/<instance>/state.json.

Lifecycle:
  load    compile (bcc) and load the three programs; bcc creates and pins
          missing maps and opens pinned ones; programs are pinned too.
          If the instance is already loaded, load adopts it instead (no
          compile, no reload, maps untouched) unless reload=True.
  adopt   open the pinned maps and programs; nothing is compiled.
  attach  XDP (or TC) ingress and TC egress on an interface, optionally in
          another network namespace. Attachments belong to the interface,
          so enforcement outlives the process that made them.
  unload  detach everything recorded, unpin, forget.

Both pins and /run vanish at reboot, so they stay consistent.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from loader import abi, attach, compile as bpfcompile, libbpf
from loader.errors import (DataplaneError, InterfaceError, PinError,
                           PrivilegeError)
from loader.maps import Map

log = logging.getLogger("dataplane.loader")

PIN_ROOT = os.environ.get("DATAPLANE_PIN_ROOT", "/sys/fs/bpf")
STATE_ROOT = os.environ.get("DATAPLANE_STATE_ROOT", "/run/dataplane")

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


@dataclasses.dataclass(frozen=True)
class MapSpec:
    attr: str            # Datapath attribute
    pin: str             # pin file name (== kernel map name), versioned
    key: object
    value: object
    size_option: str | None = None   # BuildOptions field giving max_entries
    fixed_size: int = 0
    map_type: int = libbpf.BPF_MAP_TYPE_HASH

    def expected_entries(self, options: bpfcompile.BuildOptions) -> int:
        return getattr(options, self.size_option) if self.size_option else self.fixed_size

    def expected_type(self, options: bpfcompile.BuildOptions) -> int:
        if self.attr == "ipcache" and options.identity == "lpm":
            return libbpf.BPF_MAP_TYPE_LPM_TRIE
        return self.map_type


u32 = ctypes.c_uint32
MAP_SPECS = [
    MapSpec("ipcache", "dp_ipcache_v3", abi.IpKey, abi.IpVal, "ipcache_max"),
    MapSpec("plens", "dp_plens_v3", u32, abi.Plens, fixed_size=4),
    MapSpec("gen", "dp_gen_v3", u32, abi.Gen, fixed_size=1),
    MapSpec("policy", "dp_policy_v3", abi.PolicyKey, abi.PolicyVal, "policy_max"),
    MapSpec("ranges", "dp_ranges_v3", u32, abi.RangeSet, "ranges_max", map_type=libbpf.BPF_MAP_TYPE_ARRAY),
    MapSpec("ct", "dp_ct_v3", abi.CtKey, abi.CtVal, "ct_max"),
    MapSpec("frag", "dp_frag_v3", abi.FragKey, abi.FragVal, "frag_max", map_type=libbpf.BPF_MAP_TYPE_LRU_HASH),
    MapSpec("config", "dp_config_v3", u32, abi.Config, fixed_size=1, map_type=libbpf.BPF_MAP_TYPE_ARRAY),
    MapSpec("rules", "dp_rules_v3", u32, abi.RuleCounter, "rules_max", map_type=libbpf.BPF_MAP_TYPE_PERCPU_ARRAY),
    MapSpec("reasons", "dp_reasons_v3", u32, abi.Counter, fixed_size=abi.REASON_MAX,
            map_type=libbpf.BPF_MAP_TYPE_PERCPU_ARRAY),
    MapSpec("stats", "dp_stats_v3", u32, ctypes.c_uint64, fixed_size=abi.STAT_MAX,
            map_type=libbpf.BPF_MAP_TYPE_PERCPU_ARRAY),
    MapSpec("events", "dp_events_v3", None, None, "events_bytes", map_type=libbpf.BPF_MAP_TYPE_RINGBUF),
]
MAPS_BY_ATTR = {m.attr: m for m in MAP_SPECS}

HOOKS = list(bpfcompile.PROGRAMS)  # xdp_ingress, tc_ingress, tc_egress


def prog_pin(hook: str) -> str:
    return f"prog_{hook}"


# --- preflight -----------------------------------------------------------------

def _capabilities() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    caps = _capabilities()
    has = lambda c: bool(caps & (1 << c))  # noqa: E731
    can_bpf = has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))
    if not can_bpf or not has(CAP_NET_ADMIN):
        missing = ([] if can_bpf else ["CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN)"]) + \
                  ([] if has(CAP_NET_ADMIN) else ["CAP_NET_ADMIN"])
        raise PrivilegeError(f"permission denied: loading and attaching BPF programs needs root "
                             f"(missing {', '.join(missing)})")


def check_bpffs(pin_root: str = PIN_ROOT) -> None:
    with open("/proc/self/mounts") as f:
        mounts = [line.split() for line in f]
    if not any(m[1] == pin_root and m[2] == "bpf" for m in mounts if len(m) > 2):
        raise PinError(f"bpffs is not mounted at {pin_root}; " + _bpffs_hint(pin_root))


def _bpffs_hint(pin_root: str) -> str:
    if _current_named_netns():
        # `ip netns exec` remounts /sys, hiding the host's bpffs; a new bpffs
        # mounted here would not share pins with the host.
        return (f"running inside `ip netns exec {_current_named_netns()}`? run on the host and pass "
                f"--netns {_current_named_netns()} instead")
    return f"mount it with `mount -t bpf bpf {pin_root}` (make setup does)"


def _current_named_netns() -> str | None:
    try:
        own = os.stat("/proc/self/ns/net")
        for name in os.listdir("/run/netns"):
            st = os.stat(os.path.join("/run/netns", name))
            if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
                return name
    except OSError:
        pass
    return None


def source_hash(bpf_dir: Path, options: bpfcompile.BuildOptions) -> str:
    h = hashlib.sha256()
    for path in sorted(Path(bpf_dir).rglob("*")):
        if path.suffix in (".c", ".h"):
            h.update(str(path.relative_to(bpf_dir)).encode())
            h.update(path.read_bytes())
    h.update(" ".join(options.cflags()).encode())
    return h.hexdigest()[:16]


# --- the instance ----------------------------------------------------------------

def _remove_stale_socket(path: str) -> None:
    """Removes a unix socket nothing listens on any more (an agent killed
    with SIGKILL leaves its socket behind); a live one is left alone."""
    import socket

    if not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return                      # an agent answers: not ours to remove
        except ConnectionRefusedError:
            pass
        except OSError as e:
            log.warning("left %s in place: %s", path, e)
            return
    os.unlink(path)


class Datapath:
    def __init__(self, instance: str = "default", pin_root: str = PIN_ROOT, state_root: str = STATE_ROOT):
        if not instance or "/" in instance or instance.startswith("."):
            raise DataplaneError(f"invalid instance name {instance!r}")
        self.instance = instance
        self.pin_root = pin_root
        self.pin_dir = os.path.join(pin_root, instance)
        self.state_dir = os.path.join(state_root, instance)
        self.state_path = os.path.join(self.state_dir, "state.json")
        self.maps: dict[str, Map] = {}
        self.prog_fds: dict[str, int] = {}
        self.options: bpfcompile.BuildOptions | None = None

    # -- state file --

    def _read_state(self) -> dict:
        try:
            with open(self.state_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as e:
            raise PinError(f"{self.state_path}: corrupt state file ({e})") from None

    def _write_state(self, state: dict) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        tmp = self.state_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        os.replace(tmp, self.state_path)

    # -- pins --

    def _pin(self, name: str) -> str:
        return os.path.join(self.pin_dir, name)

    def is_loaded(self) -> bool:
        names = [m.pin for m in MAP_SPECS] + [prog_pin(h) for h in HOOKS]
        return all(os.path.exists(self._pin(n)) for n in names)

    def _check_pinned_maps(self, options: bpfcompile.BuildOptions) -> None:
        """Refuses to load when a pinned map's shape differs from what the
        programs about to be compiled expect: bcc would silently use it."""
        for spec in MAP_SPECS:
            path = self._pin(spec.pin)
            if not os.path.exists(path):
                continue
            fd = libbpf.obj_get(path)
            try:
                info = libbpf.map_info(fd)
            finally:
                os.close(fd)
            want_entries = spec.expected_entries(options)
            want_type = spec.expected_type(options)
            if info.type != want_type:
                raise PinError(f"pinned map {path} is a {libbpf.MAP_TYPE_NAMES.get(info.type, info.type)}, "
                               f"this load needs a {libbpf.MAP_TYPE_NAMES.get(want_type, want_type)}; "
                               f"unload the instance first")
            if info.max_entries != want_entries:
                raise PinError(f"pinned map {path} holds {info.max_entries} entries, this load asks for "
                               f"{want_entries}; keep the size or unload the instance first")

    def _open_maps(self) -> None:
        for spec in MAP_SPECS:
            path = self._pin(spec.pin)
            if spec.key is None:   # ring buffer: fd only
                try:
                    fd = libbpf.obj_get(path)
                except OSError as e:
                    raise PinError(f"cannot open {path}: {e.strerror}") from None
                self.maps[spec.attr] = _RawMap(fd, spec.pin)
                continue
            self.maps[spec.attr] = Map.open_pinned(path, spec.key, spec.value, spec.pin)

    def _open_programs(self) -> None:
        for hook in HOOKS:
            path = self._pin(prog_pin(hook))
            try:
                self.prog_fds[hook] = libbpf.obj_get(path)
            except OSError as e:
                raise PinError(f"cannot open pinned program {path}: {e.strerror}") from None

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        for fd in self.prog_fds.values():
            os.close(fd)
        self.prog_fds.clear()

    def __getattr__(self, name):
        maps = self.__dict__.get("maps")
        if maps and name in maps:
            return maps[name]
        raise AttributeError(name)

    # -- load / adopt --

    def adopt(self) -> "Datapath":
        check_bpffs(self.pin_root)
        if not self.is_loaded():
            raise PinError(f"instance {self.instance!r} is not loaded (no complete set of pins in {self.pin_dir})")
        self.close()
        self._open_maps()
        self._open_programs()
        state = self._read_state()
        if "options" in state:
            self.options = bpfcompile.BuildOptions(**_options_from_json(state["options"]))
        return self

    def load(self, options: bpfcompile.BuildOptions | None = None, reload: bool = False,
             bpf_dir: Path | None = None) -> str:
        """Returns 'adopted', 'loaded' or 'reloaded'."""
        check_privileges()
        check_bpffs(self.pin_root)
        bpf_dir = Path(bpf_dir or bpfcompile.BPF_DIR)
        if options is None:
            # Keep what the instance was loaded with; defaults for a new one.
            recorded = self._read_state().get("options") if self.is_loaded() else None
            options = (bpfcompile.BuildOptions(**_options_from_json(recorded)) if recorded
                       else bpfcompile.BuildOptions(pin_dir=self.pin_dir))
        if options.pin_dir != self.pin_dir:
            options = dataclasses.replace(options, pin_dir=self.pin_dir)
        digest = source_hash(bpf_dir, options)

        if self.is_loaded() and not reload:
            self._check_pinned_maps(options)
            self.adopt()
            state = self._read_state()
            if state.get("source_hash") not in (None, digest):
                log.warning("instance %s runs programs built from other sources or options; "
                            "load with --reload to replace them", self.instance)
            return "adopted"

        self._check_pinned_maps(options)
        was_loaded = self.is_loaded()
        created_dir = not os.path.isdir(self.pin_dir)
        before = set(os.listdir(self.pin_dir)) if not created_dir else set()
        os.makedirs(self.pin_dir, mode=0o700, exist_ok=True)
        modules, fds = [], {}
        try:
            for hook in HOOKS:
                spec = bpfcompile.PROGRAMS[hook]
                module = bpfcompile.compile_module(spec, options, bpf_dir)
                modules.append(module)
                fds[hook] = bpfcompile.load(spec, module)
            for hook, fd in fds.items():
                self._pin_replace(fd, prog_pin(hook))
        except BaseException:
            for name in set(os.listdir(self.pin_dir)) - before:
                os.unlink(self._pin(name))
            if created_dir:
                os.rmdir(self.pin_dir)
            raise
        finally:
            for module in modules:
                module.cleanup()

        self.close()
        self._open_maps()
        self._open_programs()
        self.options = options
        state = self._read_state()
        state.update({
            "abi": abi.ABI_VERSION,
            "instance": self.instance,
            "options": dataclasses.asdict(options),
            "source_hash": digest,
            "loaded_at": time.time(),
            "programs": {h: self.program_info(h) for h in HOOKS},
        })
        state.setdefault("attachments", [])
        self._write_state(state)
        if was_loaded:
            self._reattach_all(state)
            self._unpin_other_layouts()
            return "reloaded"
        return "loaded"

    def _unpin_other_layouts(self) -> None:
        """After a reload across a layout version, the maps of the old layout
        serve no program any more: their pins go."""
        ours = f"_v{abi.ABI_VERSION}"
        for name in os.listdir(self.pin_dir):
            m = re.fullmatch(r"dp_\w+_v(\d+)", name)
            if m and not name.endswith(ours):
                log.info("removing %s: a map of layout v%s, which no loaded program uses", name, m.group(1))
                os.unlink(self._pin(name))

    def _pin_replace(self, fd: int, name: str) -> None:
        path = self._pin(name)
        tmp = path + "_new"  # bpffs refuses names with dots
        if os.path.exists(tmp):
            os.unlink(tmp)
        libbpf.obj_pin(fd, tmp)
        os.replace(tmp, path)

    def program_info(self, hook: str) -> dict:
        info = libbpf.prog_info(self.prog_fds[hook] if hook in self.prog_fds else self._prog_fd_from_pin(hook))
        return {"id": info.id, "name": info.name.decode(), "tag": bytes(info.tag).hex(),
                "verified_insns": info.verified_insns, "xlated_insns": info.xlated_prog_len // 8,
                "jited_bytes": info.jited_prog_len, "run_cnt": info.run_cnt, "run_time_ns": info.run_time_ns}

    def _prog_fd_from_pin(self, hook: str) -> int:
        fd = libbpf.obj_get(self._pin(prog_pin(hook)))
        self.prog_fds[hook] = fd
        return fd

    # -- attach / detach --

    def _our_prog_ids(self, state: dict) -> set[int]:
        ids = {self.program_info(h)["id"] for h in HOOKS if h in self.prog_fds}
        for h in state.get("programs", {}).values():
            ids.add(h.get("id", 0))
        for a in state.get("attachments", []):
            ids.update(a.get("prog_ids", {}).values())
        ids.discard(0)
        return ids

    def attach(self, ifname: str, netns: str | None = None, ingress: str = "xdp", xdp_mode: str = "auto",
               tc_pref: int = attach.TC_DEFAULT_PREF, force: bool = False) -> dict:
        """Attaches ingress (XDP or TC) and TC egress. On failure nothing of
        this call stays attached."""
        check_privileges()
        if ingress not in ("xdp", "tc"):
            raise DataplaneError(f"ingress hook must be 'xdp' or 'tc', not {ingress!r}")
        if xdp_mode not in ("auto", "native", "generic"):
            raise DataplaneError(f"XDP mode must be auto, native or generic, not {xdp_mode!r}")
        if not self.prog_fds:
            self.adopt()
        attach.ifindex_of(ifname, netns)  # unknown interface: fail before touching anything
        state = self._read_state()
        ours = self._our_prog_ids(state)
        previous = self._find_attachment(state, ifname, netns)
        done = []
        record = {"ifname": ifname, "netns": netns, "ingress": ingress, "tc_pref": tc_pref, "prog_ids": {}}
        try:
            if ingress == "xdp":
                mode = attach.xdp_attach(ifname, netns, self.prog_fds["xdp_ingress"], xdp_mode, ours, force)
                done.append("xdp")
                record["xdp_mode"] = mode
                record["prog_ids"]["xdp_ingress"] = self.program_info("xdp_ingress")["id"]
            else:
                attach.tc_attach(ifname, netns, "ingress", self.prog_fds["tc_ingress"],
                                 f"dp:{self.instance}:tc_ingress", tc_pref, force)
                done.append("tc_ingress")
                record["prog_ids"]["tc_ingress"] = self.program_info("tc_ingress")["id"]
            attach.tc_attach(ifname, netns, "egress", self.prog_fds["tc_egress"],
                             f"dp:{self.instance}:tc_egress", tc_pref, force)
            done.append("tc_egress")
            record["prog_ids"]["tc_egress"] = self.program_info("tc_egress")["id"]
        except BaseException:
            if previous is None:
                self._undo(ifname, netns, done, tc_pref)
            raise
        # Switching the ingress hook kind leaves the old one behind: remove it.
        if previous and previous.get("ingress") != ingress:
            if previous.get("ingress") == "xdp":
                attach.xdp_detach(ifname, netns, previous.get("prog_ids", {}).get("xdp_ingress", 0))
            else:
                attach.tc_detach(ifname, netns, "ingress", previous.get("tc_pref", tc_pref))
        state.setdefault("attachments", [])
        state["attachments"] = [a for a in state["attachments"]
                                if not (a["ifname"] == ifname and a.get("netns") == netns)] + [record]
        self._write_state(state)
        return record

    def _undo(self, ifname, netns, done, tc_pref):
        for what in reversed(done):
            try:
                if what == "xdp":
                    attach.xdp_detach(ifname, netns, self.program_info("xdp_ingress")["id"])
                else:
                    attach.tc_detach(ifname, netns, "ingress" if what == "tc_ingress" else "egress", tc_pref)
            except DataplaneError as e:
                log.error("while undoing a failed attach: %s", e)

    @staticmethod
    def _find_attachment(state, ifname, netns):
        for a in state.get("attachments", []):
            if a["ifname"] == ifname and a.get("netns") == netns:
                return a
        return None

    def detach(self, ifname: str, netns: str | None = None) -> bool:
        check_privileges()
        state = self._read_state()
        rec = self._find_attachment(state, ifname, netns)
        if rec is None:
            where = f" in {netns}" if netns else ""
            raise InterfaceError(f"instance {self.instance!r} is not attached to {ifname}{where}")
        self._detach_record(rec)
        state["attachments"] = [a for a in state["attachments"] if a is not rec]
        self._write_state(state)
        return True

    def _detach_record(self, rec: dict) -> None:
        ifname, netns = rec["ifname"], rec.get("netns")
        try:
            attach.ifindex_of(ifname, netns)
        except InterfaceError:
            return  # interface or namespace gone: nothing left to detach
        if rec.get("ingress") == "xdp":
            expected = rec.get("prog_ids", {}).get("xdp_ingress", 0)
            if not attach.xdp_detach(ifname, netns, expected):
                log.warning("%s: XDP program changed since attach; left in place", ifname)
        else:
            attach.tc_detach(ifname, netns, "ingress", rec.get("tc_pref", attach.TC_DEFAULT_PREF))
        attach.tc_detach(ifname, netns, "egress", rec.get("tc_pref", attach.TC_DEFAULT_PREF))

    def _reattach_all(self, state: dict) -> None:
        """After a reload: point every recorded attachment at the new programs."""
        for rec in list(state.get("attachments", [])):
            try:
                self.attach(rec["ifname"], rec.get("netns"), rec.get("ingress", "xdp"),
                            rec.get("xdp_mode", "auto"), rec.get("tc_pref", attach.TC_DEFAULT_PREF))
            except InterfaceError as e:
                log.warning("not re-attached: %s", e)

    def unload(self) -> None:
        """Detaches everything recorded, then removes pins and state."""
        check_privileges()
        state = self._read_state()
        for rec in state.get("attachments", []):
            try:
                self._detach_record(rec)
            except DataplaneError as e:
                log.warning("detach %s: %s", rec.get("ifname"), e)
        self.close()
        if os.path.isdir(self.pin_dir):
            for name in os.listdir(self.pin_dir):
                os.unlink(self._pin(name))
            os.rmdir(self.pin_dir)
        if os.path.exists(self.state_path):
            os.unlink(self.state_path)
        _remove_stale_socket(os.path.join(self.state_dir, "agent.sock"))
        if os.path.isdir(self.state_dir) and not os.listdir(self.state_dir):
            os.rmdir(self.state_dir)

    # -- inspection --

    def attachments(self) -> list[dict]:
        """Recorded attachments, each checked against the kernel."""
        out = []
        for rec in self._read_state().get("attachments", []):
            ifname, netns = rec["ifname"], rec.get("netns")
            entry = dict(rec)
            try:
                attach.ifindex_of(ifname, netns)
                present = {}
                if rec.get("ingress") == "xdp":
                    pid, mode = attach.xdp_query(ifname, netns)
                    present["xdp_ingress"] = pid == rec.get("prog_ids", {}).get("xdp_ingress")
                    entry["xdp_mode"] = mode
                else:
                    present["tc_ingress"] = any(f["prog_id"] == rec["prog_ids"].get("tc_ingress")
                                                for f in attach.tc_filters(ifname, netns, "ingress"))
                present["tc_egress"] = any(f["prog_id"] == rec["prog_ids"].get("tc_egress")
                                           for f in attach.tc_filters(ifname, netns, "egress"))
                entry["present"] = present
            except InterfaceError as e:
                entry["present"] = {}
                entry["error"] = str(e)
            out.append(entry)
        return out

    def map_summary(self) -> list[dict]:
        rows = []
        for spec in MAP_SPECS:
            m = self.maps[spec.attr]
            info = libbpf.map_info(m.fd)
            entries = None
            if spec.key is not None and info.type not in (libbpf.BPF_MAP_TYPE_ARRAY,
                                                          libbpf.BPF_MAP_TYPE_PERCPU_ARRAY):
                entries = m.count()
            rows.append({"name": spec.pin, "type": libbpf.MAP_TYPE_NAMES.get(info.type, str(info.type)),
                         "id": info.id, "key_size": info.key_size, "value_size": info.value_size,
                         "entries": entries, "capacity": info.max_entries})
        return rows

    def status(self) -> dict:
        state = self._read_state()
        return {
            "instance": self.instance,
            "pin_dir": self.pin_dir,
            "loaded": self.is_loaded(),
            "source_hash": state.get("source_hash"),
            "options": state.get("options"),
            "programs": {h: self.program_info(h) for h in HOOKS} if self.prog_fds else {},
            "maps": self.map_summary() if self.maps else [],
            "attachments": self.attachments(),
        }

    # -- runtime configuration --

    def read_config(self) -> abi.Config:
        return self.maps["config"].lookup(0)

    def set_config(self, *, audit_default: bool | None = None, allow_sample: int | None = None) -> abi.Config:
        """Runtime settings. audit_default changes the live generation's
        policy mode in place (apply_state switches it with the generation)."""
        from loader import tables

        if audit_default is not None:
            tables.set_active_generation(dp=self, gen=tables.active_generation(self), audit_default=audit_default)
        cfg = self.read_config()
        if allow_sample is not None:
            cfg.allow_sample = allow_sample
            self.maps["config"].update(0, cfg)
        return cfg

    def bump_epoch(self) -> int:
        """Makes every conntrack entry stale: each flow's next packet is judged again."""
        cfg = self.read_config()
        cfg.epoch = (cfg.epoch + 1) & 0xFFFFFFFF
        self.maps["config"].update(0, cfg)
        return cfg.epoch

    # -- counters --

    def reason_counters(self) -> dict[abi.Reason, tuple[int, int]]:
        out = {}
        for k, per_cpu in self.maps["reasons"].items():
            pk, by = sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu)
            if pk:
                try:
                    out[abi.Reason(k.value)] = (pk, by)
                except ValueError:
                    out[k.value] = (pk, by)
        return out

    def rule_counter(self, rule_id: int, direction: int | None = None) -> tuple[int, int]:
        """(packets, bytes) of one rule, in one direction or both."""
        per_cpu = self.maps["rules"].lookup(rule_id)
        dirs = (0, 1) if direction is None else (int(direction),)
        return (sum(c.dir[d].packets for c in per_cpu for d in dirs),
                sum(c.dir[d].bytes for c in per_cpu for d in dirs))

    def rule_counters(self) -> dict[int, tuple[int, int]]:
        """rule id -> (packets, bytes) over both directions, rules that counted any."""
        out = {}
        for (rule_id, _), (pk, by) in self.rule_counters_by_direction().items():
            old = out.get(rule_id, (0, 0))
            out[rule_id] = (old[0] + pk, old[1] + by)
        return out

    def rule_counters_by_direction(self) -> dict[tuple[int, abi.Direction], tuple[int, int]]:
        """(rule id, direction) -> (packets, bytes), summed over the CPUs;
        only the pairs that counted a packet. Read in one batch per call."""
        out = {}
        for k, per_cpu in self.maps["rules"].items():
            for d in (abi.Direction.INGRESS, abi.Direction.EGRESS):
                pk = sum(c.dir[d].packets for c in per_cpu)
                if pk:
                    out[(k.value, d)] = (pk, sum(c.dir[d].bytes for c in per_cpu))
        return out

    def stat_counters(self) -> dict[abi.Stat, int]:
        return {s: sum(v.value for v in self.maps["stats"].lookup(int(s))) for s in abi.Stat}


class _RawMap:
    """A map handled only by fd (the ring buffer)."""

    def __init__(self, fd: int, name: str):
        self.fd = fd
        self.name = name

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def count(self):
        return None


def _options_from_json(d: dict) -> dict:
    d = dict(d)
    d["extra_defines"] = tuple(tuple(x) for x in d.get("extra_defines", ()))
    return d


def list_instances(pin_root: str = PIN_ROOT) -> list[str]:
    if not os.path.isdir(pin_root):
        return []
    return sorted(n for n in os.listdir(pin_root)
                  if os.path.exists(os.path.join(pin_root, n, MAP_SPECS[0].pin)))
