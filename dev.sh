#!/usr/bin/env bash
# The two commands of the README, and all the set-up they need.
#
#   ./dev.sh demo [ARGS]   install into .venv and run `migrator demo` (built-in defaults)
#   ./dev.sh test [ARGS]   install into .venv (with test tools) and run the test suite
#   ./dev.sh bench ARGS    install and run `migrator bench`
#   ./dev.sh install       only install into .venv (what docker/Dockerfile runs)
#
# Works on a fresh Debian 12 machine as root: missing system packages (venv,
# a C compiler for the ABI test, iproute2 for the two-host tests) are
# installed with apt-get first.
#
# Offline, pip reads its own variables: PIP_NO_INDEX=1 PIP_FIND_LINKS=WHEELHOUSE
# ./dev.sh install installs from a folder of wheels only (docker/Dockerfile does).
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv

need_apt=()
python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || { echo "dev.sh: Python >= 3.11 is required" >&2; exit 3; }
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
if [[ "${1:-}" == test ]]; then
    command -v gcc >/dev/null || need_apt+=(gcc libc6-dev)
    [[ -f /usr/include/linux/userfaultfd.h ]] || need_apt+=(linux-libc-dev)
    command -v ip >/dev/null || need_apt+=(iproute2)
fi
if ((${#need_apt[@]})); then
    if [[ $(id -u) -ne 0 ]]; then echo "dev.sh: need these Debian packages: ${need_apt[*]} (run as root)" >&2; exit 3; fi
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

extra=""
[[ "${1:-}" == test ]] && extra="[dev]"
[[ "${1:-}" == bench ]] && extra="[dev,plots]"  # the benchmark draws its timeline
stamp="$VENV/.installed$extra"
if [[ ! -x "$VENV/bin/python" ]]; then python3 -m venv "$VENV"; fi
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    # a newer pip is welcome, not needed: offline, or with no pip in the wheelhouse, keep the venv's own
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 \
        || echo "dev.sh: could not upgrade pip; going on with $("$VENV/bin/pip" --version | cut -d' ' -f1-2)" >&2
    "$VENV/bin/pip" install -q -e ".$extra"
    touch "$stamp"
fi

cmd="${1:-demo}"; shift || true
case "$cmd" in
    demo)  exec "$VENV/bin/migrator" demo "$@" ;;
    bench) exec "$VENV/bin/migrator" bench "$@" ;;
    install) echo "installed: $VENV/bin/migrator" ;;
    test)
        set +e
        "$VENV/bin/python" -m pytest "$@"
        rc=$?
        # pytest exits 5 when no test ran: that is a failure too.
        [[ $rc -eq 5 ]] && { echo "dev.sh: no test ran" >&2; exit 1; }
        exit $rc ;;
    *) echo "usage: ./dev.sh demo|test|bench|install [ARGS]" >&2; exit 2 ;;
esac
