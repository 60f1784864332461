#!/usr/bin/env python3
"""Generate the Python stubs for proto/ into the package (route_guide's run_codegen).

    python scripts/gen_proto.py          # write migrator/wire/*_pb2*.py
    python scripts/gen_proto.py --check  # exit 1 if the committed stubs are stale

The proto's path (proto/migrator/wire/) mirrors the package, so the generated
imports (`from migrator.wire import migration_pb2`) resolve.  grpcio-tools is
pinned in pyproject's `dev` extra together with the runtime grpcio/protobuf.
"""

from __future__ import annotations

import filecmp
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTOS = ["migrator/wire/migration.proto"]
OUTPUTS = ["migration_pb2.py", "migration_pb2.pyi", "migration_pb2_grpc.py"]


def generate(out: pathlib.Path) -> None:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    for proto in PROTOS:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_DIR / proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {proto}")


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp))
        gen = pathlib.Path(tmp) / "migrator" / "wire"
        dst = ROOT / "migrator" / "wire"
        stale = [n for n in OUTPUTS if not (dst / n).exists() or not filecmp.cmp(gen / n, dst / n, shallow=False)]
        if check:
            if stale:
                print(f"stale generated code: {', '.join(stale)}; run python scripts/gen_proto.py")
                return 1
            return 0
        for n in OUTPUTS:
            shutil.copyfile(gen / n, dst / n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
