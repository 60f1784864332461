"""The snapshot commands of the CLI: `migrator snapshot`, `restore`, `serve`.

Like every command (``cli.py``), they only build a configuration and call the
library (``snapshot/capture.py``, ``restore.py``, ``serve.py``); they share
``cli.py``'s helpers and options, and are registered on its group by
:func:`register`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from migrator import cli as c
from migrator.config import DestConfig, SourceConfig
from migrator.errors import MigratorError


@click.command()
@click.option("--source", "source_addr", default=None, help="A running `migrator source` (HOST:PORT): snapshot its guest.")
@click.option("--raw", type=click.Path(dir_okay=False), default=None,
              help="Instead: a raw memory file written by another program (e.g. a VM's memory file).")
@click.option("--page-size", type=click.IntRange(512, 1 << 21), default=4096, show_default=True, help="With --raw: its page size.")
@click.option("--to", "to", required=True, type=click.Path(file_okay=False), help="The image folder to write (must not hold an image).")
@click.option("--then", type=click.Choice(["resume", "release"]), default="resume", show_default=True,
              help="After the snapshot: the guest runs on at the source, or the source releases it.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@lambda f: c.security_options(f, side="dest")
def snapshot(source_addr: str | None, raw: str | None, page_size: int, to: str, then: str, as_json: bool,
             secret_file: str | None, **kw: Any) -> None:  # fmt: skip
    """Write a guest's RAM (or a raw memory file) as a sparse image with a checksum per page.

    From a source: its guest is paused while its pages are read (never-touched
    and zero pages become holes), then resumed or released (--then).
    """
    from migrator.snapshot.capture import snapshot_raw, snapshot_source

    if (source_addr is None) == (raw is None):
        raise click.UsageError("give exactly one of --source ADDR and --raw FILE")
    if raw is None and page_size != 4096:
        raise click.BadParameter("only with --raw (a source says its own page size)", param_hint="--page-size")
    tls = c._tls(kw)
    try:
        if raw is not None:
            taken = snapshot_raw(raw, to, page_size)
        else:
            secret, _ = c.load_secret(secret_file, create=False)
            taken = snapshot_source(source_addr or "", to, then=then, secret=secret, tls=tls)
    except MigratorError as exc:
        c._fail(exc)
    m = taken.manifest
    if as_json:
        click.echo(json.dumps({**m, "paused_ms": taken.paused_ms, "elapsed_ms": taken.elapsed_ms, "then": taken.then}, indent=2))
        return
    click.echo(f"snapshot        {m['ram_size'] >> 20} MiB {m['guest']} image in {to}: {m['data_pages']} data pages, "
               f"{m['zero_pages']} holes, {m['npages']} checksums (XXH3-64), id {m['id']}")  # fmt: skip
    if taken.then != "raw":
        click.echo(f"guest           paused {taken.paused_ms:.0f} ms, then {taken.then} at the source")
    click.echo(f"took            {taken.elapsed_ms:.0f} ms")


@click.command()
@click.argument("image", type=click.Path(file_okay=False))
@c.dest_options
@click.option("--run-for", type=float, default=1.0, show_default=True, help="Seconds the guest runs after the last page.")
@click.option("--eager", is_flag=True, help="Copy every page before the guest resumes (the baseline).")
@c.ws_options
@click.option("--verify-image", is_flag=True, help="Check every page's checksum before the guest starts.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No live progress.")
def restore(image: str, run_for: float, eager: bool, verify_image: bool, as_json: bool, quiet: bool, no_verify: bool,
            **kw: Any) -> None:  # fmt: skip
    """Start the guest of an image at once, with empty RAM: its pages are read from the image
    as it touches them (userfaultfd) and prefetched in the background."""
    from migrator.probe import probe
    from migrator.runner import ProgressLine
    from migrator.snapshot.restore import RestoreOptions
    from migrator.snapshot.restore import restore as do_restore

    record_ws, ws_seconds = c._ws(kw, eager)
    result = probe()
    if not result.ok:
        c._fail(result.error())
    write_ratio = kw.pop("write_ratio")
    cfg = DestConfig(progress=not quiet, verify=not no_verify, run_for=run_for, eager=eager, **kw)
    opts = RestoreOptions(image=image, run_for=run_for, record_ws=record_ws, ws_seconds=ws_seconds,
                          verify_image=verify_image, write_ratio=write_ratio)  # fmt: skip
    show = ProgressLine(not quiet)
    try:
        res = do_restore(opts, cfg, c._signals().stop, show)
    except MigratorError as exc:
        show.done()
        c._fail(exc)
    show.done()
    click.echo(json.dumps(res.as_dict(), indent=2, sort_keys=True, default=str) if as_json else res.to_text())
    if not res.ok:
        sys.exit(5)


@click.command()
@click.argument("image", type=click.Path(file_okay=False))
@click.option("--listen", default="127.0.0.1:7000", show_default=True, help="Address to serve on (HOST:PORT; port 0 picks one).")
@click.option("--ready-file", type=click.Path(dir_okay=False), help="Write {address} as JSON here once listening.")
@click.option("--once", is_flag=True, help="Exit after one complete restore.")
@click.option("--lanes", type=click.IntRange(1, 16), default=2, show_default=True, help="Bulk lane server processes.")
@lambda f: c.security_options(f, side="source")
def serve(image: str, listen: str, ready_file: str | None, once: bool, lanes: int, secret_file: str | None,
          **kw: Any) -> None:  # fmt: skip
    """Serve an image over the migration protocol: `migrator dest --source ADDR` restores it there."""
    from migrator.snapshot.serve import serve_image

    c._listen_ok(listen)
    c._writable(ready_file, "--ready-file")
    cfg = SourceConfig(listen=listen, ready_file=ready_file, secret_file=secret_file, tls=c._tls(kw), lanes=lanes)
    try:
        served = serve_image(image, cfg, c._signals().stop, say=lambda m: click.echo(m, err=True), once=once)
    except MigratorError as exc:
        c._fail(exc)
    except OSError as exc:
        from migrator.security import ConfigError

        c._fail(ConfigError(str(exc)))
    click.echo(f"serve: {served} restore(s) served")


def register(group: click.Group) -> None:
    for cmd in (snapshot, restore, serve):
        group.add_command(cmd)
