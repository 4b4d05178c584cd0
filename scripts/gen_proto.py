#!/usr/bin/env python3
"""Generates the Python gRPC stubs from proto/ into the source tree
(dataplane/v1/*_pb2*.py), where they are committed. tests/unit/test_proto.py
regenerates them into a temporary directory and fails if the committed ones
differ, so the two cannot drift apart."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
PROTOS = sorted(p.relative_to(PROTO_DIR) for p in (PROTO_DIR / "dataplane" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            *map(str, PROTOS)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "dataplane" / "v1").glob("*.py"))


def main() -> int:
    files = generate(ROOT)
    init = ROOT / "dataplane" / "v1" / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated gRPC stubs (scripts/gen_proto.py); do not edit."""\n')
    for f in files:
        print(f.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
