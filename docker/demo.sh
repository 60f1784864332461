#!/usr/bin/env bash
# The two-container demo, built and run for real, also with no registry at all.
#
#   docker/demo.sh [--rate RATE] [--ram SIZE] [--compress MODE] [--run-for S] [--timeout S]
#   docker/demo.sh --stop-engine
#
# On a fresh Debian machine, as root, it
#   1. uses a Docker engine that answers ($DOCKER_HOST, /var/run/docker.sock, or
#      the one it started before), or installs docker.io with apt-get and starts
#      dockerd with its own data root and socket under $MIGRATOR_DOCKER_STATE
#      (default /var/lib/migrator-docker); the engine keeps running for the next
#      run (`--stop-engine` stops it);
#   2. picks the base image: migrator-base:bookworm if it was made before,
#      debian:12-slim if it is here or can be pulled (60 s), and otherwise makes
#      migrator-base:bookworm from Debian packages (debootstrap, with python3 and
#      python3-venv, so the build needs no network);
#   3. fills a wheelhouse for the image's Python (3.11) with `pip download` on the
#      host, under $MIGRATOR_DOCKER_CACHE (default /var/cache/migrator-docker);
#   4. builds migrator:local from docker/Dockerfile (pip installs from the
#      wheelhouse only; with the local base image the build runs --network none);
#   5. runs docker/docker-compose.yml with `docker compose` (v2) or `docker-compose`
#      (v1): source first, then dest, which migrates the guest, keeps it running,
#      checks every page and prints its summary ("memory verified: N of N pages");
#   6. removes the containers and the network it made (`compose down`), always.
#
# --rate RATE limits the link between the two containers (tc tbf on each
# container's eth0, set from the host with nsenter: the containers have no
# capability) and reports total time / (wire bytes / RATE).
#
# Every wait has a timeout; an expected failure prints one `demo: error: ...` line
# (and the tail of the step's log) and exits non-zero.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
STATE=${MIGRATOR_DOCKER_STATE:-/var/lib/migrator-docker}
CACHE=${MIGRATOR_DOCKER_CACHE:-/var/cache/migrator-docker}
PROJECT=migrator
IMAGE=migrator:local
LOCAL_BASE=migrator-base:bookworm
PY_VERSION=3.11                     # Debian 12's python3: what the wheels are for
CONTEXT_WHEELS=docker/wheelhouse    # the wheelhouse's place in the build context (gitignored)

rate="" ram=256MiB compress=auto run_for=5 timeout=600 stop_engine=0
usage() { sed -n '4,5p' "$0" | sed 's/^# *//' >&2; exit 2; }
while (($#)); do
    case "$1" in
        --rate|--ram|--compress|--run-for|--timeout)
            [[ -n ${2:-} ]] || { echo "demo: error: $1 needs a value" >&2; usage; }
            case "$1" in
                --rate) rate=$2 ;; --ram) ram=$2 ;; --compress) compress=$2 ;;
                --run-for) run_for=$2 ;; --timeout) timeout=$2 ;;
            esac
            shift ;;
        --stop-engine) stop_engine=1 ;;
        -h|--help) usage ;;
        *) echo "demo: error: unknown argument $1" >&2; usage ;;
    esac
    shift
done

rate_bps() {  # tc's units: kbit = 1000 bit/s
    awk -v r="$1" 'BEGIN { n = r + 0; u = tolower(substr(r, length(n "") + 1));
        m["bit"] = 1; m["kbit"] = 1e3; m["mbit"] = 1e6; m["gbit"] = 1e9; m["tbit"] = 1e12;
        if (!(u in m) || n <= 0) exit 1; printf "%.0f", n * m[u] }'
}
[[ -z $rate ]] || rate_bps "$rate" >/dev/null || { echo "demo: error: --rate $rate: use tc's form, e.g. 1gbit or 100mbit" >&2; exit 2; }
[[ $compress =~ ^(auto|none|zstd)$ ]] || { echo "demo: error: --compress is auto, none or zstd" >&2; exit 2; }
[[ $run_for =~ ^[0-9]+(\.[0-9]+)?$ && $timeout =~ ^[0-9]+$ ]] || { echo "demo: error: --run-for and --timeout take seconds" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "demo: error: run as root (it may install Docker, start dockerd, and set tc in the containers' network namespaces)" >&2; exit 3; }

T0=$SECONDS
say() { printf 'demo: [%4ds] %s\n' $((SECONDS - T0)) "$*"; }
die() { echo "demo: error: $*" >&2; exit "${rc:-1}"; }
LOGS=$CACHE/logs
mkdir -p "$STATE" "$CACHE" "$LOGS"
exec 9>"$STATE/lock"   # one run at a time: they share the engine, the images and the compose project
flock -w 600 9 || die "another docker/demo.sh still runs after 600 s ($STATE/lock)"

# run STEP TIMEOUT CMD...: CMD's output goes to $LOGS/STEP.log; on failure, its tail and one error line
run() {
    local step=$1 limit=$2; shift 2
    local status=0
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$step.log" 2>&1 </dev/null || status=$?
    if ((status)); then
        tail -n 15 "$LOGS/$step.log" | sed 's/^/    /' >&2
        [[ $status -eq 124 ]] && die "$step: timed out after ${limit}s (log: $LOGS/$step.log)"
        die "$step failed (exit $status; log: $LOGS/$step.log)"
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null || rc=3 die "no apt-get here: install $* yourself"
    if ((!APT_UPDATED)); then run apt-update 600 apt-get update -q; APT_UPDATED=1; fi
    say "apt-get install $*"
    run apt-install 1200 env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

# -- 1. the engine --------------------------------------------------------------------------------------
answers() { DOCKER_HOST=$1 timeout 15 docker version --format '{{.Server.Version}}' 2>/dev/null; }

stop_our_engine() {
    local pid
    pid=$(cat "$STATE/dockerd.pid" 2>/dev/null) || { echo "demo: no dockerd started by this script"; return 0; }
    if kill -0 "$pid" 2>/dev/null && grep -q dockerd "/proc/$pid/comm" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && die "dockerd $pid did not stop in 30 s"
        echo "demo: stopped dockerd $pid"
    fi
    rm -f "$STATE/dockerd.pid"
}
if ((stop_engine)); then stop_our_engine; exit 0; fi

OUR_HOST=unix://$STATE/docker.sock
answering_engine() {
    local h v
    for h in ${DOCKER_HOST:-} unix:///var/run/docker.sock "$OUR_HOST"; do
        if v=$(answers "$h") && [[ -n $v ]]; then export DOCKER_HOST=$h; say "engine $h (Docker $v)"; return 0; fi
    done
    return 1
}
engine() {
    local v
    command -v docker >/dev/null || apt_install docker.io
    answering_engine && return
    [[ -n ${DOCKER_HOST:-} ]] && die "DOCKER_HOST=$DOCKER_HOST does not answer (unset it to let this script start an engine)"
    if ! command -v dockerd >/dev/null; then
        apt_install docker.io
        answering_engine && return  # with systemd, installing docker.io starts docker.service
    fi
    say "starting dockerd (data root $STATE/data, socket $OUR_HOST, log $STATE/dockerd.log)"
    setsid dockerd --data-root "$STATE/data" --exec-root "$STATE/exec" --pidfile "$STATE/dockerd.pid" \
        -H "$OUR_HOST" >>"$STATE/dockerd.log" 2>&1 </dev/null 9>&- &
    local pid=$! deadline=$((SECONDS + 60))
    until v=$(answers "$OUR_HOST") && [[ -n $v ]]; do
        if ! kill -0 $pid 2>/dev/null; then tail -n 5 "$STATE/dockerd.log" >&2; die "dockerd exited (log: $STATE/dockerd.log)"; fi
        ((SECONDS < deadline)) || die "dockerd did not answer within 60 s (log: $STATE/dockerd.log)"
        sleep 0.5
    done
    export DOCKER_HOST=$OUR_HOST
    say "engine $DOCKER_HOST (Docker $v, dockerd $pid, started by this script; stop it with docker/demo.sh --stop-engine)"
}

COMPOSE=()
find_compose() {
    if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
    elif command -v docker-compose >/dev/null && docker-compose version >/dev/null 2>&1; then COMPOSE=(docker-compose)
    else apt_install docker-compose; COMPOSE=(docker-compose)
    fi
    say "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || echo '?'))"
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# -- 2. the base image ------------------------------------------------------------------------------------
debian_mirror() {
    [[ -n ${MIGRATOR_DEBIAN_MIRROR:-} ]] && { echo "$MIGRATOR_DEBIAN_MIRROR"; return; }
    local m
    m=$(grep -hsE '^(URIs:|deb) ' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list |
        grep -oE 'https?://[^ ]*/debian/?' | grep -v security | head -n1 || true)
    echo "${m:-http://deb.debian.org/debian}"
}

BASE="" OFFLINE=0
base_image() {
    if have_image "$LOCAL_BASE"; then BASE=$LOCAL_BASE OFFLINE=1; say "base image $BASE (made before)"; return; fi
    if have_image debian:12-slim; then BASE=debian:12-slim; say "base image $BASE (here already)"; return; fi
    say "pulling debian:12-slim (60 s at most)"
    local pulled=0
    timeout 60 docker pull -q debian:12-slim >"$LOGS/pull.log" 2>&1 || pulled=$?
    if ((pulled == 0)); then BASE=debian:12-slim; say "base image $BASE (pulled)"; return; fi
    local why="docker pull failed, see $LOGS/pull.log"
    ((pulled == 124)) && why="no answer in 60 s"
    say "no registry answers ($why); making $LOCAL_BASE from Debian packages"
    command -v debootstrap >/dev/null || apt_install debootstrap
    [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || apt_install debian-archive-keyring
    local root=$CACHE/rootfs mirror
    mirror=$(debian_mirror)
    rm -rf "$root"
    say "debootstrap --variant=minbase --include=python3,python3-venv bookworm ($mirror)"
    run debootstrap 1200 debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$mirror"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    run import 600 sh -c "tar -C '$root' -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD [\"bash\"]' - '$LOCAL_BASE'"
    rm -rf "$root"
    BASE=$LOCAL_BASE OFFLINE=1
    say "base image $BASE made ($(docker image inspect -f '{{.Size}}' "$BASE" | awk '{printf "%.0f MB", $1/1e6}'))"
}

# -- 3. the wheelhouse --------------------------------------------------------------------------------------
wheels() { local w=("$1"/*.whl); echo "${#w[@]}"; }
wheelhouse() {
    local wh=$CACHE/wheelhouse arch reqs
    arch=$(uname -m)
    # what `pip install -e .` needs in the image: the dependencies, the build backend, and pip itself
    reqs=$(python3 - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
doc = tomllib.load(open(sys.argv[1], "rb"))
print("\n".join([*doc["project"]["dependencies"], *doc["build-system"]["requires"], "pip"]))
EOF
    ) || rc=3 die "cannot read pyproject.toml with this python3 (Python >= 3.11 is required)"
    if [[ -f $wh/.requirements && $(cat "$wh/.requirements") == "$PY_VERSION $arch"$'\n'"$reqs" ]]; then
        say "wheelhouse $wh ($(wheels "$wh") wheels, made before)"
        return
    fi
    local pip=$CACHE/pip-venv/bin/pip
    if [[ ! -x $pip ]]; then
        python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
        run pip-venv 300 python3 -m venv "$CACHE/pip-venv"
    fi
    say "pip download into $wh (for CPython $PY_VERSION on $arch)"
    mkdir -p "$wh"
    mapfile -t reqarr <<<"$reqs"
    run pip-download 900 "$pip" download -q --dest "$wh" --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp --abi "cp${PY_VERSION/./}" --platform "manylinux2014_$arch" \
        --platform "manylinux_2_17_$arch" --platform "manylinux_2_28_$arch" "${reqarr[@]}"
    printf '%s\n%s\n' "$PY_VERSION $arch" "$reqs" >"$wh/.requirements"
    say "wheelhouse $wh ($(wheels "$wh") wheels)"
}

# -- 4. the image -----------------------------------------------------------------------------------------------
build_image() {
    trap 'rm -rf "${REPO:?}/$CONTEXT_WHEELS"' EXIT
    rm -rf "${REPO:?}/$CONTEXT_WHEELS"
    cp -r "$CACHE/wheelhouse" "$REPO/$CONTEXT_WHEELS"
    local net=() old
    ((OFFLINE)) && net=(--network none)
    old=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    say "docker build $IMAGE from $BASE${net:+ (no network)}"
    run build 1800 docker build -f "$REPO/docker/Dockerfile" -t "$IMAGE" "${net[@]}" \
        --build-arg "BASE=$BASE" --build-arg "WHEELHOUSE=$CONTEXT_WHEELS" "$REPO"
    rm -rf "${REPO:?}/$CONTEXT_WHEELS"
    # the image this build replaced (the build cache keeps what a rebuild reuses)
    if [[ -n $old && $old != $(docker image inspect -f '{{.Id}}' "$IMAGE") ]]; then docker rmi "$old" >/dev/null 2>&1 || true; fi
    say "image $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
}

# -- 5. the migration ----------------------------------------------------------------------------------------------
compose() { (cd "$REPO/docker" && timeout --kill-after=10 "$1" "${COMPOSE[@]}" -p "$PROJECT" -f docker-compose.yml "${@:2}"); }

down() { compose 120 down --volumes --remove-orphans -t 5 >"$LOGS/down.log" 2>&1 || echo "demo: compose down failed (log: $LOGS/down.log)" >&2; }

container() { local id; id=$(compose 60 ps -q "$1") && [[ -n $id ]] && echo "$id"; }

limit_link() {  # tc tbf on the container's eth0, from the host, in the container's network namespace
    local pid burst=256k
    pid=$(docker inspect -f '{{.State.Pid}}' "$1")
    [[ $pid -gt 0 ]] || die "container $1 is not running"
    (($(rate_bps "$rate") < 1000000000)) && burst=32k
    nsenter -t "$pid" -n tc qdisc replace dev eth0 root tbf rate "$rate" burst $burst latency 50ms \
        || die "tc tbf on $2's eth0 failed"
}

wait_healthy() {
    local id=$1 deadline=$((SECONDS + $2)) st
    while :; do
        st=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")
        [[ $st == "running healthy" ]] && return
        [[ $st == running* ]] || { docker logs --tail 5 "$id" >&2; die "the source container stopped ($st)"; }
        ((SECONDS < deadline)) || die "the source was not ready within $2 s"
        sleep 0.5
    done
}

migrate() {
    export MIGRATOR_SECRET=${MIGRATOR_SECRET:-$(head -c 24 /dev/urandom | base64)}
    export MIGRATOR_RAM=$ram MIGRATOR_COMPRESS=$compress MIGRATOR_RUN_FOR=$run_for
    down  # a run that was killed may have left its containers
    trap 'down; rm -rf "${REPO:?}/$CONTEXT_WHEELS"' EXIT
    say "compose up: source ($ram guest)"
    compose 180 up -d --no-build source >"$LOGS/up-source.log" 2>&1 || { cat "$LOGS/up-source.log" >&2; die "compose up source failed"; }
    local src dst
    src=$(container source) || die "no source container"
    wait_healthy "$src" 180
    if [[ -n $rate ]]; then
        command -v tc >/dev/null || apt_install iproute2
        limit_link "$src" source
        say "link limited: tbf $rate on source's eth0"
    fi
    say "compose up: dest (migrates, runs the guest ${run_for} s, checks every page)"
    compose 180 up -d --no-build dest >"$LOGS/up-dest.log" 2>&1 || { cat "$LOGS/up-dest.log" >&2; die "compose up dest failed"; }
    dst=$(container dest) || die "no dest container"
    if [[ -n $rate ]]; then limit_link "$dst" dest; say "link limited: tbf $rate on dest's eth0"; fi
    local code
    code=$(timeout "$timeout" docker wait "$dst") || die "the destination did not finish within $timeout s (--timeout)"
    local src_code
    src_code=$(timeout 60 docker wait "$src") || src_code="still running after 60 s"
    say "dest exited $code, source exited $src_code"
    echo
    docker logs "$dst" 2>"$LOGS/dest-progress.log" | tee "$LOGS/dest-summary.log"
    echo
    [[ $code == 0 ]] || { tail -n 5 "$LOGS/dest-progress.log" >&2; die "the destination failed (exit $code)"; }
    grep -qE '^memory verified: ([0-9]+) of \1 pages$' "$LOGS/dest-summary.log" || die "no 'memory verified: N of N pages' line"
    if [[ -n $rate ]]; then
        awk -v bps="$(rate_bps "$rate")" -v rate="$rate" '
            /^total time/ { ms = $3 } /^wire/ { mib = $2 }
            END { link = mib * 1048576 * 8 / bps; printf "demo: link %s: total %.2f s, wire %.1f MiB needs %.2f s at the link rate: total / link = %.3f\n", rate, ms / 1000, mib, link, ms / 1000 / link }' \
            "$LOGS/dest-summary.log"
    fi
}

engine
find_compose
base_image
wheelhouse
build_image
migrate
say "done"
