"""Authentication and TLS: nothing of the guest's memory leaves for a peer
without the migration's secret or the right certificate.

Evidence that nothing left: the source's own final JSON (bytes sent, pages
served, its phase: the guest was never even paused) after the refused
attempts, and a correct destination that then migrates the same guest.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_userfaultfd
from tests.helpers import procs
from tests.helpers.pki import make_ca as _ca
from tests.helpers.pki import make_cert as _cert

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("migrator: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _dest(addr: str, *extra: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return procs.run([*procs.MIGRATOR, "dest", "--source", addr, "--run-for", "0", "--quiet", "--no-verify", *extra],
                     timeout, env=env)  # fmt: skip


def _stop_source_json(src: procs.Cmd) -> dict:
    src.signal(signal.SIGTERM)
    src.wait(20)
    out = src.stdout()
    return json.loads(out[out.index("{") :])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("pki")
    ca = _ca(d, "ca")
    other = _ca(d, "other-ca")
    return {
        "ca": ca,
        "other-ca": other,
        "server": _cert(d, "server", ca),
        "expired": _cert(d, "expired", ca, days=-1),
        "client": _cert(d, "client", ca),
        "foreign-client": _cert(d, "foreign-client", other),
    }


# -- secret --------------------------------------------------------------------------
def test_wrong_and_missing_secret_are_refused_and_nothing_leaves(tmp_path: Path) -> None:
    require_userfaultfd()
    with procs.running_source(tmp_path, "32MiB", "--json") as (src, info):
        wrong = _dest(info["address"], env={"MIGRATOR_SECRET": "not-the-secret"})
        assert wrong.returncode == 8, wrong.stderr
        assert "wrong migration secret" in _one_line_error(wrong.stderr)
        missing = _dest(info["address"], env={"MIGRATOR_SECRET": ""})
        assert missing.returncode == 8, missing.stderr
        assert "no migration secret" in _one_line_error(missing.stderr)
        stats = _stop_source_json(src)
    assert stats["refused_auth"] >= 2
    assert stats["bytes_sent"] == 0 and stats["demand_pages"] == 0 and stats["bulk_pages"] == 0
    assert stats["phase"] == "running"  # the guest was never paused


def test_secret_file_is_created_private_and_works(tmp_path: Path) -> None:
    require_userfaultfd()
    secret = tmp_path / "migration.secret"
    with procs.running_source(tmp_path, "32MiB", "--secret-file", str(secret)) as (src, info):
        assert secret.exists() and secret.stat().st_mode & 0o077 == 0
        assert "wrote a new migration secret" in src.stderr()
        ok = _dest(info["address"], "--secret-file", str(secret), env={"MIGRATOR_SECRET": ""})
        assert ok.returncode == 0, ok.stderr
        assert src.wait(30) == 0, src.stderr()
    assert secret.read_text().strip() not in (src.stderr() + src.stdout())  # never printed


def test_generated_secret_is_printed_once(tmp_path: Path) -> None:
    require_userfaultfd()
    with procs.running_source(tmp_path, "32MiB") as (src, info):
        pass
    with procs.command(procs.source_args(tmp_path / "r2.json", "32MiB"), tmp_path, "src2", env={"MIGRATOR_SECRET": ""}) as src2:
        info2 = procs.wait_ready(src2, tmp_path / "r2.json")
        token = info2["secret"]
        assert token and src2.stderr().count(token) == 1
        ok = _dest(info2["address"], env={"MIGRATOR_SECRET": token})
        assert ok.returncode == 0, ok.stderr


# -- TLS --------------------------------------------------------------------------------
def _tls_source(tmp: Path, pki: dict, *, cert: str = "server", mutual: bool = False) -> procs.Cmd:
    c, k = pki[cert]
    extra = ["--tls-cert", str(c), "--tls-key", str(k), "--json"] + (["--tls-ca", str(pki["ca"][0])] if mutual else [])
    return procs.start(procs.source_args(tmp / f"ready-{cert}-{mutual}.json", "32MiB", *extra), tmp, f"src-{cert}-{mutual}")


def test_tls_migration_and_plain_client_refused(tmp_path: Path, pki: dict) -> None:
    require_userfaultfd()
    src = _tls_source(tmp_path, pki)
    try:
        info = procs.wait_ready(src, tmp_path / "ready-server-False.json")
        plain = _dest(info["address"], "--quiet")
        assert plain.returncode == 4, plain.stderr
        assert "cannot connect to the source" in _one_line_error(plain.stderr)
        ok = _dest(info["address"], "--tls-ca", str(pki["ca"][0]))
        assert ok.returncode == 0, ok.stderr
        assert src.wait(30) == 0, src.stderr()
    finally:
        src.close()


def test_expired_or_foreign_server_certificate_refused(tmp_path: Path, pki: dict) -> None:
    require_userfaultfd()
    expired = _tls_source(tmp_path, pki, cert="expired")
    try:
        info = procs.wait_ready(expired, tmp_path / "ready-expired-False.json")
        r = _dest(info["address"], "--tls-ca", str(pki["ca"][0]))
        assert r.returncode == 4, r.stderr
        _one_line_error(r.stderr)
        foreign_ca = _dest(info["address"], "--tls-ca", str(pki["other-ca"][0]))
        assert foreign_ca.returncode == 4, foreign_ca.stderr
        stats = _stop_source_json(expired)
        assert stats["bytes_sent"] == 0 and stats["phase"] == "running"
    finally:
        expired.close()


def test_mutual_tls_refuses_a_foreign_client_certificate(tmp_path: Path, pki: dict) -> None:
    require_userfaultfd()
    src = _tls_source(tmp_path, pki, mutual=True)
    try:
        info = procs.wait_ready(src, tmp_path / "ready-server-True.json")
        ca = ["--tls-ca", str(pki["ca"][0])]
        none = _dest(info["address"], *ca)
        assert none.returncode == 4, none.stderr
        fc, fk = pki["foreign-client"]
        foreign = _dest(info["address"], *ca, "--tls-cert", str(fc), "--tls-key", str(fk))
        assert foreign.returncode == 4, foreign.stderr
        _one_line_error(foreign.stderr)
        c, k = pki["client"]
        ok = _dest(info["address"], *ca, "--tls-cert", str(c), "--tls-key", str(k))
        assert ok.returncode == 0, ok.stderr
        out = src.wait(30)
        assert out == 0, src.stderr()
    finally:
        src.close()
