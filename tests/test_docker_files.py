"""docker/: the Dockerfile, the compose file and the seccomp profile, checked without an engine.

* the compose file is the YAML we think it is (PyYAML, and ``docker compose config``
  or ``docker-compose config`` where one is installed); its ``${VAR:-default}``
  values are read with their defaults, as Compose does when VAR is unset;
* every ``migrator`` command line in it and in the Dockerfile exists in the CLI:
  each option is in ``migrator CMD --help`` and the whole line parses with the
  CLI's own click parser (types and choices included);
* the image installs the package the README's way (``./dev.sh``), nothing else,
  from a registry's ``debian:12-slim`` or offline (a local base image and a
  wheelhouse: build arguments);
* the seccomp profile is valid and allows userfaultfd;
* and the privileges the compose file gives each container are enough, and the
  profile is needed: ``helpers/container_sim.py`` applies the same capabilities,
  no_new_privs, seccomp profile and missing /dev/userfaultfd to plain processes,
  and a whole migration runs under them between two network-namespace hosts.

``test_docker_demo.py`` builds the image and runs the compose file with a real engine.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from helpers import procs
from helpers.netns import SRC_ADDR, TwoHosts, two_hosts  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
PROFILE = DOCKER / "seccomp-uffd.json"
CONTAINER_SIM = Path(__file__).resolve().parent / "helpers" / "container_sim.py"

#: what a container's root keeps unless cap_drop/cap_add say otherwise (Docker's defaults)
DOCKER_DEFAULT_CAPS = {
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
}  # fmt: skip


# -- reading the files ------------------------------------------------------------------------
_VAR = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """``${VAR:-default}`` as Compose reads it with VAR unset (``${VAR:?msg}`` stays: it needs VAR)."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(3) if m.group(2) == "-" else m.group(0), value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict), COMPOSE
    return dict(interpolate(doc))


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    cur = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not cur:
            continue
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip():
            instr, _, args = cur.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
        cur = ""
    return out


def instructions(name: str) -> list[str]:
    return [args for instr, args in dockerfile() if instr == name]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def entrypoint() -> list[str]:
    (ep,) = instructions("ENTRYPOINT")
    return exec_form(ep)


def dev_sh_runs() -> list[list[str]]:
    """The ``./dev.sh ...`` commands of the Dockerfile's RUN steps (up to a redirection or &&)."""
    out = []
    for run in instructions("RUN"):
        for part in run.split("&&"):
            words = shlex.split(part)
            if words and words[0] in ("./dev.sh", "dev.sh", "bash"):
                words = words[1:] if words[0] == "bash" else words
                out.append([w for w in words[1:] if not w.startswith(">") and not w.startswith("2>")])
    return out


def migrator_lines() -> list[tuple[str, list[str]]]:
    """(where, argv after ``migrator``) for every migrator invocation in docker/."""
    ep = entrypoint()
    assert ep == ["migrator"]
    lines = [("Dockerfile CMD", exec_form(c)) for c in instructions("CMD")]
    # `dev.sh CMD ARGS` runs `migrator CMD ARGS`, except `install`, which only installs
    lines += [("Dockerfile RUN ./dev.sh", argv) for argv in dev_sh_runs() if argv[:1] != ["install"]]
    for name, svc in compose()["services"].items():
        if svc.get("command") is not None:
            assert isinstance(svc["command"], list), f"{name}: use the exec form (a list) for command"
            lines.append((f"compose {name} command", svc["command"]))
        test = (svc.get("healthcheck") or {}).get("test")
        if test and test[0] == "CMD" and test[1] == "migrator":
            lines.append((f"compose {name} healthcheck", test[2:]))
    return lines


def service_caps(svc: dict[str, Any]) -> set[str]:
    drop = {c if c.startswith("CAP_") else f"CAP_{c}" for c in svc.get("cap_drop") or []}
    add = {c if c.startswith("CAP_") else f"CAP_{c}" for c in svc.get("cap_add") or []}
    base = set() if "CAP_ALL" in drop else DOCKER_DEFAULT_CAPS - drop
    return base | add


def service_seccomp(svc: dict[str, Any]) -> Path | None:
    for opt in svc.get("security_opt") or []:
        key, _, value = opt.replace(":", "=", 1).partition("=") if opt.startswith("seccomp:") else opt.partition("=")
        if key == "seccomp":
            return (COMPOSE.parent / value).resolve()
    return None


def option_value(argv: list[str], name: str) -> str:
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]


# -- the compose file -------------------------------------------------------------------------
def compose_commands() -> list[list[str]]:
    """The Compose commands installed here: ``docker compose`` (v2) and ``docker-compose`` (v1)."""
    found = []
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            found.append(cmd)
    return found


def test_compose_config_with_docker_compose() -> None:
    commands = compose_commands()
    if not commands:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed here")
    for cmd in commands:
        # from docker/, as docker/demo.sh runs it: v1 reads the seccomp profile relative to
        # the working directory, v2 relative to the compose file
        r = subprocess.run([*cmd, "-f", COMPOSE.name, "config", "--quiet"], capture_output=True, text=True, timeout=60, cwd=DOCKER)
        assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"


def test_compose_file_shape() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"source", "dest"}
    src, dst = services["source"], services["dest"]
    for name, svc in services.items():
        build = svc["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == REPO, name
        assert (REPO / build["dockerfile"]).resolve() == DOCKERFILE, name
        for net in svc["networks"]:
            assert net in doc["networks"], (name, net)
        # least privilege: nothing beyond Docker's defaults is granted anywhere...
        assert not svc.get("privileged") and not svc.get("cap_add") and not svc.get("devices"), name
        assert service_caps(svc) == set(), f"{name} keeps capabilities it does not need"
        # `=`, not `:` (dockerd warns that the `:` form is deprecated)
        assert "no-new-privileges=true" in svc["security_opt"], name
    # ...but the destination's seccomp profile, which is the one extra it needs
    assert service_seccomp(src) is None
    assert service_seccomp(dst) == PROFILE.resolve()
    # dest finds the source by its service name, on the source's port, once it is ready
    assert "source" in dst["depends_on"]
    host, _, port = option_value(dst["command"], "--source").rpartition(":")
    assert host == "source" and port == option_value(src["command"], "--listen").rpartition(":")[2]
    assert dst["depends_on"]["source"]["condition"] == "service_healthy"
    assert option_value(src["command"], "--ready-file") in src["healthcheck"]["test"]
    assert dst["healthcheck"]["test"] == ["CMD", "migrator", "dest", "--check"]
    assert src["command"][:5] == ["source", "--listen", "0.0.0.0:7000", "--ram", "256MiB"]
    assert dst["command"] == ["dest", "--source", "source:7000", "--compress", "auto", "--run-for", "5"]
    assert doc["networks"]["migration"].get("internal") is True  # no route anywhere but between the two


# -- the CLI lines ------------------------------------------------------------------------------
@pytest.mark.parametrize("where,argv", migrator_lines(), ids=lambda v: v if isinstance(v, str) else None)
def test_migrator_lines_exist_in_the_cli(where: str, argv: list[str]) -> None:
    cmd = [] if argv[0].startswith("-") else [argv[0]]
    r = procs.run([*procs.MIGRATOR, *cmd, "--help"], timeout=60)
    assert r.returncode == 0, f"{where}: `migrator {' '.join(cmd)} --help` failed:\n{r.stderr}"
    for word in argv:
        if word.startswith("--"):
            assert f"{word.split('=')[0]} " in r.stdout or f"{word.split('=')[0]}," in r.stdout or word == "--help", (
                f"{where}: option {word} is not in `migrator {' '.join(cmd)} --help`"
            )
    if "--help" in argv:
        return
    # the whole line parses with the CLI's own parser (types, choices, ranges), without running it
    from migrator.cli import main

    with click.Context(main, info_name="migrator") as ctx:
        sub = main.get_command(ctx, argv[0])
        assert sub is not None, f"{where}: no command {argv[0]!r}"
        try:
            sub.make_context(argv[0], list(argv[1:]), parent=ctx)
        except click.ClickException as exc:
            pytest.fail(f"{where}: {shlex.join(argv)}: {exc.format_message()}")
        except ValueError as exc:  # some click versions let a failed conversion through
            pytest.fail(f"{where}: {shlex.join(argv)}: {exc}")


# -- the Dockerfile --------------------------------------------------------------------------------
def test_dockerfile_installs_the_readme_way() -> None:
    readme, dev_sh = (REPO / "README.md").read_text(), (REPO / "dev.sh").read_text()
    # a registry's Debian 12 by default; a local base image (offline) by build argument
    assert dockerfile()[0] == ("ARG", "BASE=debian:12-slim")
    froms = instructions("FROM")
    assert froms[0] == "${BASE} AS runtime" and froms[-1] == "runtime", froms
    # no `# syntax=` line: BuildKit would fetch that frontend from a registry, and offline it cannot
    assert "# syntax" not in DOCKERFILE.read_text()
    runs = " ".join(instructions("RUN"))
    # the one installer is the README's: ./dev.sh (venv + pip install -e .)
    assert dev_sh_runs() == [["install"]], dev_sh_runs()
    assert "./dev.sh demo" in readme
    for other in ("pip install", "pip3 install", "-m venv", "setup.py"):
        assert other not in runs, f"the Dockerfile installs on its own ({other!r}); dev.sh must do it"
    # offline, pip reads the wheelhouse and nothing else, through its own variables
    assert instructions("ARG") == ["BASE=debian:12-slim", "WHEELHOUSE="]
    assert 'PIP_NO_INDEX=1 PIP_FIND_LINKS="/opt/migrator/$WHEELHOUSE"' in runs
    # the console script it puts on PATH is the one dev.sh installs, in the tree the last stage copies
    assert "VENV=.venv" in dev_sh
    (workdir,) = set(instructions("WORKDIR"))
    env = " ".join(instructions("ENV"))
    assert f"PATH={workdir}/.venv/bin:$PATH" in env
    copies = [a for i, a in dockerfile() if i == "COPY"]
    assert copies == [". .", f"--from=install {workdir} {workdir}"], copies
    assert entrypoint() == ["migrator"]
    # a host's .venv must not reach the image (dev.sh would take it for an install)
    for ignore_file in (DOCKER / "Dockerfile.dockerignore", REPO / ".dockerignore"):
        ignore = ignore_file.read_text().split()
        assert ".venv" in ignore and ".git" in ignore, ignore_file


# -- the seccomp profile ---------------------------------------------------------------------------
def unconditional_allows(profile: dict[str, Any]) -> set[str]:
    return {
        n
        for e in profile["syscalls"]
        if e["action"] == "SCMP_ACT_ALLOW" and not e.get("args") and not e.get("includes") and not e.get("excludes")
        for n in e["names"]
    }


def test_seccomp_profile_allows_userfaultfd() -> None:
    profile = json.loads(PROFILE.read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert "SCMP_ARCH_X86_64" in {a["architecture"] for a in profile["archMap"]}
    assert "SCMP_ARCH_AARCH64" in {a["architecture"] for a in profile["archMap"]}
    allowed = unconditional_allows(profile)
    assert "userfaultfd" in allowed
    # what the rest of the stack needs is there too (the emulated run below proves it)
    for name in ("read", "write", "openat", "mmap", "munmap", "mprotect", "futex", "epoll_wait", "epoll_ctl",
                 "eventfd2", "ioctl", "connect", "accept4", "sendmsg", "recvmsg", "pread64", "preadv", "execve",
                 "wait4", "pipe2", "socketpair", "madvise", "getrandom", "rseq"):  # fmt: skip
        assert name in allowed, name
    # and nothing a container must not have
    for name in ("mount", "unshare", "setns", "bpf", "kexec_load", "init_module", "ptrace"):
        assert name not in allowed, name


# -- the privileges, applied ---------------------------------------------------------------------------
def _require_container_sim() -> None:
    if os.geteuid() != 0:
        pytest.skip("emulating a container's privileges needs root")
    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp is not installed (apt-get install libseccomp2)")


def as_container(svc: dict[str, Any], argv: list[str]) -> list[str]:
    """``argv`` with the capabilities and seccomp profile that the compose file gives ``svc``."""
    profile = service_seccomp(svc)
    wrap = [sys.executable, str(CONTAINER_SIM), "--seccomp", str(profile or PROFILE)]
    if profile is None:  # Docker's default profile: ours without its one addition
        wrap += ["--without", "userfaultfd"]
    for cap in sorted(service_caps(svc)):
        wrap += ["--cap", cap]
    return [*wrap, "--", *argv]


def test_healthcheck_under_the_dest_containers_privileges(userfaultfd_required: None) -> None:
    _require_container_sim()
    dst = compose()["services"]["dest"]
    check = [*procs.MIGRATOR, *dst["healthcheck"]["test"][2:]]
    r = procs.run(as_container(dst, check), timeout=60)
    assert r.returncode == 0 and "userfaultfd ok" in r.stdout, r.stdout + r.stderr
    # without the profile's addition the healthcheck fails, and says why
    r = procs.run(as_container({**dst, "security_opt": []}, check), timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "seccomp" in r.stdout and "docker/seccomp-uffd.json" in r.stdout, r.stdout


@pytest.mark.netns
def test_compose_migration_under_container_privileges(two_hosts: TwoHosts, tmp_path: Path, userfaultfd_required: None) -> None:
    """The compose file's two command lines (smaller guest, shorter run), each with
    its service's privileges, on two hosts: the migration completes and verifies."""
    _require_container_sim()
    services = compose()["services"]
    src, dst = services["source"], services["dest"]
    ready = tmp_path / "ready.json"
    src_argv = [*procs.MIGRATOR, *src["command"], "--ram", "64MiB", "--ready-file", str(ready)]
    dst_argv = [*procs.MIGRATOR, *dst["command"], "--source", f"{SRC_ADDR}:7000", "--run-for", "1", "--json", "--quiet"]
    with two_hosts.src.command(as_container(src, src_argv), tmp_path, "source") as source:
        procs.wait_ready(source, ready)
        r = two_hosts.dst.run(as_container(dst, dst_argv), timeout=150)
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        assert s["ok"] is True and s["verified_pages"] == s["pages"] == 16384 and s["verify_errors"] == []
        assert source.wait(30) == 0, source.stderr()
