"""Loader: compiles the BPF programs (bcc), attaches them (XDP, TC clsact),
pins programs and maps under /sys/fs/bpf/<instance>/, adopts existing pins,
and gives typed access to the maps. It knows nothing of policies."""
