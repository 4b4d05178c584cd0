#!/usr/bin/env bash
# Installs and prepares everything the project needs on Debian 12, as root.
# Idempotent: every step checks before it acts, so running it again is cheap.
set -euo pipefail

cd "$(dirname "$0")/.."
say() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "setup: must run as root (it installs packages, mounts bpffs and loads BPF programs)" >&2
    exit 1
fi

arch=$(dpkg --print-architecture)
pkgs=(python3 python3-venv python3-dev python3-bpfcc bpfcc-tools libbpf1 bpftool clang llvm
      "linux-headers-$arch" iproute2 iputils-ping ethtool procps make git etcd-server prometheus
      iptables nftables ipset python3-matplotlib)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The tests start their own etcd and Prometheus on loopback; the system
    # services the packages start are not needed here.
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        for unit in etcd prometheus; do
            case " ${missing[*]} " in *" ${unit/etcd/etcd-server} "*)
                systemctl disable --now "$unit" >/dev/null 2>&1 || true ;;
            esac
        done
    fi
fi

# bcc looks for kernel headers under /lib/modules/$(uname -r). When the
# running kernel has none of its own (a VM kernel), point it at the newest
# Debian headers: networking programs only use UAPI definitions, which are
# stable across versions.
rel=$(uname -r)
mod="/lib/modules/$rel"
if [ ! -e "$mod/build/include" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$hdr" ]; then
        echo "setup: no kernel headers under /usr/src after installing linux-headers-$arch" >&2
        exit 1
    fi
    common="${hdr%-"$arch"}-common"
    say "linking kernel headers $hdr for $rel"
    mkdir -p "$mod"
    ln -sfn "$hdr" "$mod/build"
    [ -e "$mod/source" ] || ln -sfn "$common" "$mod/source"
fi

if ! mountpoint -q /sys/fs/bpf; then
    say "mounting bpffs at /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf
fi

# bcc's Python module imports only under Debian's interpreter.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.base_prefix != "/usr")' 2>/dev/null; then
    say "creating .venv from /usr/bin/python3 (with system site packages, for bcc)"
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing the project and its test dependencies into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi
.venv/bin/python -c 'import bcc, pyroute2, scapy' || { echo "setup: Python dependencies do not import" >&2; exit 1; }
say "ready"
