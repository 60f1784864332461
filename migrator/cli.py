"""The `migrator` command line.  Commands only build a frozen config and call the library.

Exit codes: 0 ok, 1 unexpected, 2 usage, 3 cannot run here (userfaultfd),
4 transport (source unreachable or gone), 5 guest failure, 6 protocol or
integrity error, 7 userfaultfd ioctl failure, 8 secret refused, 9 unusable
image (snapshot), 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click

# gRPC's C core logs TLS handshake failures and the like on stderr at INFO;
# our one-line errors say it better.  Must be set before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from migrator import __version__
from migrator.config import DestConfig, GuestOptions, SourceConfig, parse_precopy, parse_size
from migrator.errors import MigratorError
from migrator.security import TlsFiles, load_secret


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()


class PrecopyType(click.ParamType):
    name = "SECONDS|auto|0"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, bool]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_precopy(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _precopy_kw(kw: dict[str, Any]) -> dict[str, Any]:
    """The options' ``precopy`` (seconds, auto) as DestConfig's two fields."""
    seconds, auto = kw.pop("precopy", (0.0, False))
    return {**kw, "precopy": seconds, "precopy_auto": auto}


def run() -> None:
    """Console-script entry point: a second Ctrl-C ends with one line, not a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        click.echo("migrator: interrupted", err=True)
        sys.exit(130)


def _listen_ok(listen: str) -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"not HOST:PORT: {listen!r}", param_hint="--listen")


def _hop_ok(listen: str, tls: TlsFiles, lanes: int) -> None:
    """Before the migration: could the next hop listen there, with these TLS files?"""
    import socket

    if tls.enabled and not (tls.cert and tls.key):
        raise click.BadParameter("serving the next hop with TLS needs --tls-cert and --tls-key", param_hint="--listen")
    host, _, port_s = listen.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host or None, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise click.BadParameter(f"cannot resolve {host!r}: {exc.strerror or exc}", param_hint="--listen") from None
    port = int(port_s)
    if not port:
        return  # a free block is picked when the hop starts
    family, *_rest, addr = infos[0]
    for p in range(port, port + 2 + lanes):  # control, urgent, lanes
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr[0], p))
            except OSError as exc:
                raise click.BadParameter(f"port {p} on {host} is not free ({exc.strerror})", param_hint="--listen") from None


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _writable(path: str | None, option: str) -> None:
    """Refuse, before anything starts, a file option that could only fail later."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise click.BadParameter(f"cannot write {path}: {folder} is not a writable folder", param_hint=option)


def _plot_ok(plot: str | None) -> None:
    if plot is None:
        return
    if not _have_matplotlib():
        raise click.BadParameter("needs matplotlib: pip install 'migrator[plots]' (or ./dev.sh bench)", param_hint="--plot")
    _writable(plot, "--plot")


def _fail(exc: MigratorError) -> None:
    click.echo(f"migrator: error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _signals() -> Any:
    """SIGINT/SIGTERM (stop) and SIGUSR1 (roll-back), handled storm-safe (``signals.py``)."""
    from migrator.signals import Signals

    return Signals()


@click.group(context_settings={"auto_envvar_prefix": "MIGRATOR", "help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on stderr.")
def main(verbose: bool) -> None:
    """Post-copy live migration of a guest over userfaultfd and gRPC."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(name)s: %(message)s")


def security_options(f: Any, *, side: str) -> Any:
    opts = [
        click.option("--secret-file", type=click.Path(dir_okay=False),
                     help=("The migration's secret; created (mode 0600) if missing. Default: $MIGRATOR_SECRET, "
                           "else a new secret is printed." if side == "source" else
                           "The migration's secret (as the source has it). Default: $MIGRATOR_SECRET.")),
        click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False),
                     help="TLS certificate (PEM) of this side." + (" Enables TLS." if side == "source" else " For mutual TLS.")),
        click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="Private key (PEM) of --tls-cert."),
        click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False),
                     help=("CA (PEM) that client certificates must chain to: mutual TLS." if side == "source" else
                           "CA (PEM) to verify the source's certificate; enables TLS.")),
    ]  # fmt: skip
    for o in reversed(opts):
        f = o(f)
    return f


def _tls(kw: dict[str, Any]) -> TlsFiles:
    return TlsFiles(cert=kw.pop("tls_cert"), key=kw.pop("tls_key"), ca=kw.pop("tls_ca"))


def guest_options(f: Any) -> Any:
    opts = [
        click.option("--ram", type=SIZE, default="256MiB", show_default=True, help="Guest RAM size."),
        click.option("--vcpus", type=click.IntRange(1, 64), default=2, show_default=True),
        click.option("--workload", type=click.Choice(["random", "sequential", "hotset", "hotscatter"]), default="random", show_default=True),
        click.option("--write-ratio", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Share of accesses that write."),
        click.option("--zero-pct", type=click.IntRange(0, 100), default=40, show_default=True, help="Pages never written at start."),
        click.option("--text-pct", type=click.IntRange(0, 100), default=30, show_default=True, help="Compressible pages at start."),
        click.option("--seed", type=int, default=1, show_default=True),
        click.option("--rate", type=click.IntRange(0), default=0, show_default=True,
                     help="Operations per second per vCPU (0 = as fast as it goes)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _guest(kw: dict[str, Any]) -> GuestOptions:
    if kw["zero_pct"] + kw["text_pct"] > 100:
        raise click.BadParameter("--zero-pct + --text-pct must be at most 100")
    return GuestOptions(**{k: kw.pop(k) for k in ("ram", "vcpus", "workload", "write_ratio", "zero_pct", "text_pct", "seed", "rate")})


@main.command()
@click.option("--listen", default="127.0.0.1:7000", show_default=True, help="Address for the page server (HOST:PORT; port 0 picks one).")
@guest_options
@click.option("--ready-file", type=click.Path(dir_okay=False), help="Write {address, guest_pid} as JSON here once listening.")
@click.option("--keep-guest", is_flag=True, help="After completion keep the paused guest until stopped.")
@click.option("--switchover-timeout", type=click.FloatRange(0.5, 3600), default=5.0, show_default=True,
              help="Seconds after the pause within which the destination must take the guest; else it runs here again.")
@click.option("--lanes", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Bulk lane server processes (ports P+2 ...); the urgent server is on P+1.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
@lambda f: security_options(f, side="source")
def source(listen: str, ready_file: str | None, keep_guest: bool, switchover_timeout: float, lanes: int,
           as_json: bool, secret_file: str | None, **kw: Any) -> None:  # fmt: skip
    """Start a guest and serve its memory to a destination.

    The guest stays here until a destination has every page.  `kill -USR1 PID`
    asks for a roll-back (refused while a destination may be running the guest);
    `migrator rollback --force` does it anyway.
    """
    from migrator.source.run import run_source

    tls = _tls(kw)
    _writable(ready_file, "--ready-file")
    cfg = SourceConfig(listen=listen, guest=_guest(kw), ready_file=ready_file, keep_guest=keep_guest, json=as_json,
                       secret_file=secret_file, tls=tls, switchover_timeout=switchover_timeout, lanes=lanes)  # fmt: skip
    sig = _signals()  # SIGUSR1: the user's explicit roll-back
    try:
        result = run_source(cfg, sig.stop, say=lambda m: click.echo(m, err=True), rollback=sig.rollback)
    except MigratorError as exc:
        _fail(exc)
    except OSError as exc:  # e.g. the port is taken
        from migrator.security import ConfigError

        _fail(ConfigError(str(exc)))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        discarded = result.get("discarded_pages", 0)
        click.echo(f"source: {result['phase']}: served {result['demand_pages']} demand + {result['bulk_pages']} bulk pages, "
                   f"{result['bytes_sent'] / (1 << 20):.1f} MiB"
                   + (f"; {discarded} pages discarded by the destination's guest (not sent after that)" if discarded else ""))  # fmt: skip
    if result["phase"] not in ("completed", "running"):
        sys.exit(4)


def dest_options(f: Any, *, override: bool = True) -> Any:
    opts = [
        click.option("--fault-threads", type=click.IntRange(1, 16), default=1, show_default=True,
                     help="Threads waiting on the userfaultfd (EPOLLEXCLUSIVE: one woken per fault)."),
        click.option("--lanes", type=click.IntRange(1, 16), default=2, show_default=True,
                     help="Bulk lane processes, each streaming a share of guest RAM on its own connection."),
        click.option("--window", "demand_window", type=click.IntRange(1, 256), default=4, show_default=True, help="Pages fetched per demand fault."),
        click.option("--compress", type=click.Choice(["auto", "none", "zstd"]), default="auto", show_default=True,
                     help="Bulk stream compression; auto = off on loopback, on otherwise."),  # fmt: skip
        click.option("--batch-pages", type=click.IntRange(1, 1024), default=512, show_default=True, help="Pages per bulk message (512 = 2 MiB)."),
        click.option("--no-verify", is_flag=True, help="Skip the guest's full self-check at the end."),
        click.option("--reconnect-deadline", type=click.FloatRange(0), default=300.0, show_default=True,
                     help="Seconds to keep reconnecting to a lost source before giving up."),  # fmt: skip
        click.option("--balloon", "balloon_pages", type=click.IntRange(0), default=0, show_default=True,
                     help="Right after the resume the guest gives this many pages back (madvise DONTNEED, as a "
                          "balloon driver does): they read as zeros and are never copied."),
        click.option("--precopy", type=PrecopyType(), default="0", show_default=True, metavar="SECONDS|auto|0",
                     help="Pre-copy first: stream the running guest's pages (and again those it writes) for up to "
                          "SECONDS, or until the rounds stop shrinking (auto), then switch to post-copy; 0 = pure post-copy."),
        click.option("--hot-first", is_flag=True,
                     help="After the switch, send the pages the guest wrote last first (the source tracks its writes)."),
        click.option("--prefetch-delay", type=click.FloatRange(0), default=0.0, hidden=True,
                     help="Seconds the bulk lanes wait after the resume (to measure faults with an idle bulk)."),
    ]
    if override:
        opts.append(click.option("--write-ratio", type=click.FloatRange(0, 1), default=None, help="Override the guest's write ratio here."))
    for o in reversed(opts):
        f = o(f)
    return f


def ws_options(f: Any) -> Any:
    """Working sets (``dest/workingset.py``), for restores and migrations alike."""
    opts = [
        click.option("--record-ws", type=click.Path(dir_okay=False), default=None,
                     help="Record the pages the guest touches first, in order, to this file (lanes held back --ws-seconds)."),
        click.option("--ws-seconds", type=click.FloatRange(0.1, 600), default=2.0, show_default=True, help="The recording window."),
        click.option("--replay-ws", type=click.Path(dir_okay=False), default=None, help="Fetch this recorded working set first."),
        click.option("--replay-mode", type=click.Choice(["before", "while"]), default="before", show_default=True,
                     help="Resume the guest once the working set is in (before) or at once (while)."),
    ]  # fmt: skip
    for o in reversed(opts):
        f = o(f)
    return f


def _ws(kw: dict[str, Any], eager: bool = False) -> tuple[str | None, float]:
    """Check the working-set options; move the replay ones into ``kw`` (DestConfig's), and
    for a recording set the demand window to one page and hold the lanes back.
    Returns (record path, window)."""
    record, seconds = kw.pop("record_ws"), kw.pop("ws_seconds")
    if record and (kw["replay_ws"] or eager):
        raise click.UsageError("--record-ws records a lazy restore: not with --replay-ws or --eager")
    if eager and kw["replay_ws"]:
        raise click.UsageError("--eager copies everything first: a working set adds nothing")
    _writable(record, "--record-ws")
    if kw["replay_ws"]:
        from migrator.dest import workingset

        try:
            workingset.load(kw["replay_ws"], image="", npages=None, page_size=None)
        except MigratorError as exc:
            _fail(exc)
    if record:
        kw.update(demand_window=1, prefetch_delay=seconds)
    return record, seconds


@main.command()
@click.option("--source", "source_addr", default="127.0.0.1:7000", show_default=True, help="The source's page server.")
@dest_options
@ws_options
@click.option("--run-for", type=float, default=None, help="Seconds to keep the guest running after the last page (default: until Ctrl-C).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--check", is_flag=True, help="Only probe whether userfaultfd works here, then exit (0 = yes, 3 = no).")
@click.option("--quiet", is_flag=True, help="No live progress.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a PNG timeline here (needs the `plots` extra).")
@click.option("--listen", default=None, help="After the migration, serve the guest here for the next hop (HOST:PORT).")
@click.option("--ready-file", type=click.Path(dir_okay=False), help="With --listen: write {address, guest_pid} here once serving.")
@lambda f: security_options(f, side="dest")
def dest(source_addr: str, run_for: float | None, as_json: bool, check: bool, quiet: bool, no_verify: bool, plot: str | None,
         listen: str | None, ready_file: str | None, secret_file: str | None, **kw: Any) -> None:  # fmt: skip
    """Migrate the source's guest here, post-copy, and keep it running."""
    from migrator.probe import probe

    result = probe()
    if check:
        click.echo(result.message)
        sys.exit(0 if result.ok else 3)
    if not result.ok:
        _fail(result.error())
    from migrator.runner import run_destination_outcome

    record_ws, ws_seconds = _ws(kw)
    tls = _tls(kw)
    sig = _signals()  # from the start: a SIGUSR1 before the next hop serves is only noted
    # everything that can fail on its own fails now, before the source pauses its guest
    _plot_ok(plot)
    _writable(ready_file, "--ready-file")
    if listen:
        _listen_ok(listen)
        _hop_ok(listen, tls, kw["lanes"])
    try:
        secret, _ = load_secret(secret_file, create=False)
    except MigratorError as exc:
        _fail(exc)
    cfg = DestConfig(source=source_addr, run_for=run_for, progress=not quiet, verify=not no_verify, secret=secret, tls=tls,
                     **_precopy_kw(kw))  # fmt: skip
    if listen and run_for is None:
        cfg = DestConfig(**{**cfg.__dict__, "run_for": 0.0})  # the guest runs on while it waits for the next hop
    stop = sig.stop
    try:
        summary, out = run_destination_outcome(cfg, stop, plot, keep_guest=bool(listen))
        if record_ws:
            from migrator.dest import workingset

            n = workingset.save_recorded(record_ws, out, ws_seconds, image="")
            click.echo(f"working set: {n} pages recorded to {record_ws}", err=True)
    except MigratorError as exc:
        _fail(exc)
    click.echo(summary.to_json() if as_json else summary.to_text())
    sys.stdout.flush()
    if not summary.ok:
        if listen:
            out.guest.kill()
        sys.exit(5)
    if listen:
        from migrator.source.run import serve_guest

        hop = SourceConfig(listen=listen, ready_file=ready_file, secret_file=secret_file, tls=tls, lanes=kw["lanes"])
        sig.rollback.clear()  # only a roll-back of the next hop counts
        try:
            if summary.pages_remapped:  # its pages are read where guest RAM was mapped: not there any more
                raise MigratorError("the guest moved part of its RAM (mremap) while it migrated here; a next hop "
                                    "needs it where it was mapped")  # fmt: skip
            served = serve_guest(out.guest, hop, stop, say=lambda m: click.echo(m, err=True), rollback=sig.rollback)
        except (MigratorError, OSError, RuntimeError) as exc:
            # never stop a complete guest because the next hop cannot start: it runs on here
            click.echo(f"migrator: cannot serve the next hop ({exc}); the guest keeps running here until stopped", err=True)
            stop.wait()
            out.guest.quit()
            sys.exit(4)
        if served["phase"] not in ("completed", "running"):  # stopped mid-hop: the guest is lost
            sys.exit(4)


@main.command()
@guest_options
@lambda f: dest_options(f, override=False)
@click.option("--run-for", type=float, default=2.0, show_default=True, help="Seconds the guest keeps running on the destination.")
@click.option("--warmup", type=float, default=1.0, show_default=True, help="Seconds the guest runs on the source first.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No live progress.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG timeline here (needs the `plots` extra; default migrator-demo.png when matplotlib is installed).")  # fmt: skip
def demo(run_for: float, warmup: float, as_json: bool, quiet: bool, no_verify: bool, plot: str | None, **kw: Any) -> None:
    """Start a source and migrate its guest to a destination on this machine."""
    from migrator.probe import probe
    from migrator.runner import run_demo

    result = probe()
    if not result.ok:
        _fail(result.error())
    guest = _guest(kw)
    _plot_ok(plot)
    cfg = DestConfig(source="127.0.0.1:0", run_for=run_for, progress=not quiet, verify=not no_verify, **_precopy_kw(kw))
    stop = _signals().stop
    try:
        if plot is None and _have_matplotlib():
            plot = "migrator-demo.png"
        summary = run_demo(guest, cfg, warmup, stop, plot)
    except MigratorError as exc:
        _fail(exc)
    click.echo(summary.to_json() if as_json else summary.to_text())
    if not as_json and "timeline_png" in summary.extra:
        click.echo(f"timeline        {summary.extra['timeline_png']}")
    if not summary.ok:
        sys.exit(5)


@main.command()
@click.option("--source", "source_addr", default="127.0.0.1:7000", show_default=True, help="The source's page server.")
@click.option("--force", is_flag=True,
              help="Also when a destination may be running the guest (two live guests if it still does).")
@lambda f: security_options(f, side="dest")
def rollback(source_addr: str, force: bool, secret_file: str | None, **kw: Any) -> None:
    """Take a migrating guest back on its source: it runs there again, from its state at the pause.

    Refused while a destination may be running the guest (it switched over),
    unless --force: use that only when the destination's host is gone for good.
    """
    from migrator.dest.source_client import GrpcControl

    tls = _tls(kw)
    try:
        secret, _ = load_secret(secret_file, create=False)
        src = GrpcControl(source_addr, secret=secret, tls=tls)
        try:
            message = src.rollback(force)
        finally:
            src.close()
    except MigratorError as exc:
        _fail(exc)
    click.echo(f"source: {message}")
    if not message.startswith("rolled back"):
        sys.exit(1)


@main.command()
def check() -> None:
    """Probe whether userfaultfd works here and say why not (exit 0 = yes, 3 = no)."""
    from migrator.probe import probe

    result = probe()
    click.echo(result.message)
    sys.exit(0 if result.ok else 3)


@main.command()
@click.argument("scenario", type=click.Choice(["migrate-1g", "qemu-mix", "fault-latency", "wakeups", "bulk", "grpc-forms", "precopy", "restore", "all"]))
@click.option("--runs", type=click.IntRange(1, 50), default=3, show_default=True, help="Runs per configuration (medians are reported).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="bench-results", show_default=True, help="Where JSON (and PNG) results go.")
@click.option("--ram", type=SIZE, default=None, help="Guest RAM for the migration scenarios (default: the scenario's own).")
@click.option("--peer", type=click.Path(exists=True, dir_okay=False), default=None,
              help="precopy: also run the QEMU peer script (../shared/peers/qemu_postcopy.py) in the same sitting.")
def bench(scenario: str, runs: int, out_dir: str, ram: int | None, peer: str | None) -> None:
    """Run a benchmark scenario several times; print medians (min–max) and write JSON.

    \b
    migrate-1g     1 GiB guest (40 % zero, 30 % text, 30 % random), two vCPUs writing, loopback
    qemu-mix       QEMU's peer workload: 1 GiB, 1 vCPU, 25/25/50, 4096 writes/s and flat out
    fault-latency  demand-fault latency with the bulk stream idle vs running
    wakeups        fault storm: blocking read() vs EPOLLEXCLUSIVE, 1/2/4 fault threads
    bulk           bulk-stream throughput with compression none / zstd / auto
    grpc-forms     the transport alone: sync unary / sync stream / asyncio stream, 1 or 2 bulk streams
    precopy        pure / hot-first / pre-copy + post-copy on QEMU peer's workload (--peer: QEMU's too)
    restore        snapshot once; restore lazily, replaying a working set (before / while), eagerly
    """
    from migrator.bench.grpc_forms import grpc_forms
    from migrator.bench.precopy import precopy
    from migrator.bench.restore import restore_bench
    from migrator.bench.scenarios import SCENARIOS
    from migrator.bench.wakeups import wakeups
    from migrator.probe import probe

    result = probe()
    if not result.ok:
        _fail(result.error())
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(f"cannot create {out_dir}: {exc.strerror}", param_hint="--out") from None
    names = ["migrate-1g", "qemu-mix", "fault-latency", "wakeups", "bulk", "grpc-forms"] if scenario == "all" else [scenario]
    for name in names:
        click.echo(f"{name} ({runs} runs):", err=True)
        fn = {"wakeups": wakeups, "grpc-forms": grpc_forms, "precopy": precopy, "restore": restore_bench}.get(name) or SCENARIOS[name]
        kwargs: dict[str, Any] = {"ram": ram} if ram and (name in SCENARIOS or name in ("precopy", "restore")) else {}
        if name == "precopy" and peer:
            kwargs["peer"] = peer
        try:
            res = fn(runs, out_dir, lambda m: click.echo(m, err=True), **kwargs)
        except MigratorError as exc:
            _fail(exc)
        click.echo(f"{name}: median (min–max) of {runs} runs")
        click.echo(res["text"])
        click.echo(f"  JSON: {out_dir}/{name}.json")


def _register_snapshot_commands() -> None:
    """`snapshot`, `restore`, `serve`: in ``snapshot/commands.py``, with the same helpers."""
    from migrator.snapshot.commands import register

    register(main)


_register_snapshot_commands()
