"""PNG plots (matplotlib, Agg: no display needed): latency CDFs, tokens/s over time, the sweep curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .client import RequestResult  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latency_cdfs(results: list[RequestResult], path: str | Path, title: str = "") -> Path:
    done = [r for r in results if r.ok]
    series = {
        "TTFT": [r.ttft for r in done],
        "TPOT": [r.tpot for r in done if r.tpot is not None],
        "ITL": [g for r in done for g in r.itl],
        "E2E": [r.e2e for r in done],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, vals) in zip(axes.flat, series.items()):
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
        if not vals:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
            continue
        x = np.sort(np.asarray(vals) * 1000.0)
        ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post")
        for p, style in ((50, ":"), (99, "--")):
            ax.axvline(np.percentile(x, p), color="gray", linestyle=style, label=f"p{p} {np.percentile(x, p):.1f}")
        ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, Path(path))


def throughput_over_time(series: dict[str, Any], path: str | Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(10, 4))
    t = np.asarray(series["t_s"]) + series["bin_s"] / 2
    ax.plot(t, series["output_tokens_per_s"], label="output tokens/s")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(t, series["completions_per_s"], color="tab:orange", alpha=0.6, label="completions/s")
    ax2.set_ylabel("completions/s")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    ax.set_title(title or f"throughput over time ({series['bin_s']:.2f} s bins)")
    return _save(fig, Path(path))


def sweep_curve(runs: list[dict[str, Any]], path: str | Path) -> Path:
    """Latency (p50 and p99 of TTFT, TPOT, E2E) against achieved output-token throughput, one point per rate."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    x = [r["metrics"]["output_token_throughput"] for r in runs]
    for ax, key in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms")):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            y = [r["metrics"][key][stat] for r in runs]
            pts = [(a, b) for a, b in zip(x, y) if b is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=stat)
        for r, xi in zip(runs, x):
            yv = r["metrics"][key]["median"]
            if yv is not None:
                ax.annotate(str(r["request_rate"]), (xi, yv), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(key.split("_")[0].upper() + " (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("throughput-latency curve (labels: request rate)")
    return _save(fig, Path(path))
