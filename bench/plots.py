"""PNG plots of benchmark results, next to their JSON.

    python -m bench.plots bench/results/<file>.json [...]

matplotlib comes with the `bench` extra (`pip install -e '.[bench]'`, which `make bench` does).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(result: dict[str, Any], out: Path) -> Path:
    """Listings/s per run scenario (bars) with the worker's peak RSS (labels)."""
    plt = _pyplot()
    names = [k for k, v in result.items() if isinstance(v, dict) and "listings_per_s" in v]
    rates = [result[k]["listings_per_s"] for k in names]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bars = ax.barh(names, rates, color="#4472c4")
    for bar, name in zip(bars, names, strict=True):
        row = result[name]
        ax.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f" {row['listings_per_s']:,.0f}/s, {row['listings']:,} listings,"
            f" worker {row['worker_peak_rss_mb']:,.0f} MB",
            va="center",
            fontsize=8,
        )
    model_only = result.get("model_only_images_per_s")
    if model_only:
        ax.axvline(model_only, color="#c00000", linestyle="--", label="model alone (img/s)")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("listings/s")
    ax.set_xlim(0, max([*rates, model_only or 0]) * 1.6)
    ax.set_title(f"Runs, {result['model']} on {result['device']} ({result['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_throughput(result: dict[str, Any], out: Path) -> Path:
    """Model-only images/s against batch size, with the pipeline rates as points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for model in sorted({row["model"] for row in result.get("model", [])}):
        rows = [r for r in result["model"] if r["model"] == model]
        ax.plot([r["batch"] for r in rows], [r["images_per_s"] for r in rows], "o-", label=model)
    for row in result.get("pipeline", []):
        ax.plot(row["batch_max_size"], row["listings_per_s"], "s", label=f"pipeline {row['model']}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("images or listings / s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    for name in sys.argv[1:]:
        path = Path(name)
        result = json.loads(path.read_text())
        plot = plot_runs if "reindex" in result else plot_throughput
        print(f"wrote {plot(result, path.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
