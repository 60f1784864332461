"""The committed protobuf/gRPC stubs are what scripts/gen_proto.py generates from proto/."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"gen_proto.py --check failed:\n{result.stdout}{result.stderr}"


def test_check_fails_on_stale_stubs(tmp_path: pathlib.Path) -> None:
    """The check is not vacuous: a copy of the tree with an edited stub is reported stale."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (pip install -e '.[dev]')")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "gen_proto.py", tmp_path / "scripts")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copytree(ROOT / "migrator" / "wire", tmp_path / "migrator" / "wire")
    stub = tmp_path / "migrator" / "wire" / "migration_pb2_grpc.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    result = subprocess.run(
        [sys.executable, str(tmp_path / "scripts" / "gen_proto.py"), "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "migration_pb2_grpc.py" in result.stdout
