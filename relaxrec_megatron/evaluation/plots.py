"""The paper's throughput-versus-quality pictures, from this project's own measurements (matplotlib,
an optional extra: `pip install 'relaxrec-megatron[plot]'`)."""

from __future__ import annotations

from pathlib import Path

from ..files import write_atomically


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))


def exit_tradeoff(report: dict, path: str) -> None:
    """Agreement with the full-depth token and perplexity against mean loops per token, one point per
    threshold and a line per criterion (a report of `relaxrec eval exits`)."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6.5), sharex=True)
    for criterion, marker in (("maxprob", "o"), ("margin", "s")):
        rows = sorted((r for r in report["rows"] if r["criterion"] == criterion), key=lambda r: r["mean_loops"])
        x = [r["mean_loops"] for r in rows]
        top.plot(x, [100 * r["agreement"] for r in rows], marker=marker, label=criterion)
        bottom.plot(x, [r["perplexity"] for r in rows], marker=marker, label=criterion)
        for r in rows if criterion == "maxprob" else ():
            top.annotate(f"{r['threshold']:g}", (r["mean_loops"], 100 * r["agreement"]), fontsize=7,
                         textcoords="offset points", xytext=(3, 3))
    for b, ppl in enumerate(report["per_loop_perplexity"]):
        bottom.axhline(ppl, color="grey", lw=0.8, ls=":")
        bottom.annotate(f"loop {b + 1} alone", (1.0, ppl), fontsize=7, color="grey")
    top.axhline(100 * report["agreement_target"], color="grey", lw=0.8, ls="--")
    for criterion, marker in (("maxprob", "o"), ("margin", "s")):
        chosen = report.get(criterion)
        if chosen:  # the calibrated threshold
            top.scatter([chosen["mean_loops"]], [100 * chosen["agreement"]], marker="*", s=140, color="black", zorder=3)
    bottom.set_yscale("log")
    top.set_ylabel("agreement with full depth (%)")
    bottom.set_ylabel("perplexity")
    bottom.set_xlabel("mean loops per token")
    top.legend()
    top.set_title(f"early exits: {Path(str(report['model'])).name}, {report['tokens']} tokens", fontsize=10)
    _save(fig, path)
    plt.close(fig)


def serve_throughput(results: dict, path: str) -> None:
    """Tokens/s against loops per token, one point per serving mode, measured (filled) and predicted by
    the two simulations (hollow: seq-CB's measured tokens/s times the simulated speedup); one panel
    per model (the rows of `relaxrec bench serve`)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items()):
        seq = rows[0]["tokens_per_s"] / rows[0]["speedup"]  # every row's speedup is over seq-CB
        for i, r in enumerate(rows):
            color = f"C{i % 10}"
            ax.scatter([r["mean_loops"]], [r["tokens_per_s"]], color=color, label=r["mode"])
            for column, marker in (("simulated", "^"), ("bytes sim", "v")):
                if r.get(column):
                    ax.scatter([r["mean_loops"]], [seq * r[column]], marker=marker, facecolors="none",
                               edgecolors=color)
        ax.scatter([], [], marker="^", facecolors="none", edgecolors="black", label="paper's simulation")
        ax.scatter([], [], marker="v", facecolors="none", edgecolors="black", label="bytes simulation")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("loops per token")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)
