"""Plots of benchmark results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from typing import Any


def plot_budget(
    points: list[dict[str, Any]],
    budget_s: float,
    path: str,
    title: str,
    best: dict[str, Any] | None = None,
) -> str:
    """Latency against queries/s, as NVIDIA's fixed-response-time figure: the batch sweep (p99 and mean
    e2e, each point labelled with its batch size), the Poisson sweep, the budget as a horizontal line,
    the batch-1 point and the best point within the budget marked. Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    batch = sorted((p for p in points if p["mode"] == "batch"), key=lambda p: p["queries_per_s"])
    poisson = sorted((p for p in points if p["mode"] == "poisson"), key=lambda p: p["queries_per_s"])
    for pts, marker, color, name in (
        (batch, "o", "tab:green", "batch sweep"),
        (poisson, "s", "tab:blue", "Poisson arrivals"),
    ):
        if not pts:
            continue
        x = [p["queries_per_s"] for p in pts]
        ax.plot(x, [p["e2e_p99_s"] for p in pts], marker + "-", color=color, label=f"{name}, p99")
        ax.plot(
            x, [p["e2e_mean_s"] for p in pts], marker + "--", color=color, alpha=0.5, label=f"{name}, mean"
        )
    for p in batch:
        ax.annotate(
            f"B={p['batch_size']}",
            (p["queries_per_s"], p["e2e_p99_s"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.axhline(budget_s, color="tab:red", linestyle=":", label=f"{budget_s:g} s response-time budget")
    b1 = next((p for p in batch if p["batch_size"] == 1), None)
    if b1 is not None:
        ax.plot([b1["queries_per_s"]], [b1["e2e_p99_s"]], "*", color="black", markersize=14, label="batch 1")
        ax.annotate(
            f"batch 1: {b1['queries_per_s']:.3g} q/s, {b1['e2e_p99_s']:.3g} s",
            (b1["queries_per_s"], b1["e2e_p99_s"]),
            textcoords="offset points",
            xytext=(8, -14),
            fontsize=8,
        )
    if best is not None:
        ax.plot(
            [best["queries_per_s"]],
            [best["e2e_p99_s"]],
            "o",
            markersize=16,
            markerfacecolor="none",
            markeredgecolor="tab:red",
            markeredgewidth=2,
        )
        ax.annotate(
            f"{best['queries_per_s']:.3g} queries/s within {budget_s:g} s response time",
            (best["queries_per_s"], best["e2e_p99_s"]),
            textcoords="offset points",
            xytext=(-10, 14),
            ha="right",
            fontsize=9,
            color="tab:red",
            fontweight="bold",
        )
    ax.set_xlabel("queries/s")
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
