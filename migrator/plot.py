"""A PNG timeline of one migration (matplotlib, the optional `plots` extra).

Top: pages installed over time, cumulative, by demand / prefetch / zero.
Bottom: every demand fault's latency as a point (log scale).
Pause (t = 0), resume and the last page are marked.
"""

from __future__ import annotations

from migrator.dest.session import Outcome
from migrator.errors import MigratorError


def write_timeline(out: Outcome, path: str, title: str = "") -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MigratorError("plots need matplotlib: pip install 'migrator[plots]'") from exc
    st = out.stats
    wall0, perf0 = st.clock_ref
    paused = out.paused_ns

    def ms_perf(t: int) -> float:  # perf_counter_ns -> ms since the pause
        return (t - perf0 + wall0 - paused) / 1e6

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[3, 2])
    series: dict[str, tuple[list[float], list[int]]] = {}
    totals: dict[str, int] = {}
    names = {"demand": "demand", "prefetch": "prefetch", "zero": "zero"}
    for t, kind, pages, _ in sorted(st.timeline):
        k = names.get(kind, "prefetch")
        totals[k] = totals.get(k, 0) + pages
        xs, ys = series.setdefault(k, ([0.0], [0]))
        xs.append(ms_perf(t))
        ys.append(totals[k])
    colors = {"demand": "tab:red", "prefetch": "tab:blue", "zero": "tab:gray"}
    for k, (xs, ys) in series.items():
        ax1.step(xs, ys, where="post", label=f"{k} ({totals[k]} pages)", color=colors[k])
    ax1.set_ylabel("pages installed (cumulative)")
    ax1.legend(loc="upper left")
    lat_x = [ms_perf(t) for t in st.fault_done_ns]
    lat_y = [v / 1e3 for v in st.fault_latency_ns]
    ax2.scatter(lat_x, lat_y, s=4, color="tab:red", alpha=0.6, label=f"fault latency ({len(lat_y)} faults)")
    if lat_y:
        ax2.set_yscale("log")
    ax2.set_ylabel("fault latency (µs)")
    ax2.set_xlabel("ms since the source paused")
    ax2.legend(loc="upper right")
    marks = [(0.0, "pause", "black"), ((out.resumed_ns - paused) / 1e6, "resume", "green"), ((out.done_ns - paused) / 1e6, "last page", "purple")]
    for ax in (ax1, ax2):
        for x, label, c in marks:
            ax.axvline(x, color=c, linestyle="--", linewidth=1)
    for x, label, c in marks:
        ax1.annotate(label, (x, ax1.get_ylim()[1]), color=c, rotation=90, va="top", ha="right", fontsize=8)
    mib = out.manifest.ram_size >> 20
    fig.suptitle(title or f"post-copy migration of a {mib} MiB guest")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
