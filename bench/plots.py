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
    ax.set_xlim(0, max([*rates, model_only or 0]) * 1.75)
    ax.set_title(f"Runs, {result['model']} on {result['device']} ({result['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_throughput(result: dict[str, Any], out: Path) -> Path:
    """Three panels: listings/s against batch size (pipeline, model alone, no-op drain, peer),
    the trickle's latency CDF, and the simulated accelerator's ratios."""
    plt = _pyplot()
    fig, (rates, latency, simulated) = plt.subplots(1, 3, figsize=(16, 4.6))
    _plot_rates(rates, result)
    _plot_latency(latency, result.get("trickle"))
    _plot_simulated(
        simulated, result.get("simulated", []), result.get("simulated_pil_path") or None
    )
    title = "quick run, " if result.get("quick") else ""
    fig.suptitle(f"Throughput, {title}{result['device']} ({result['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_rates(ax: Any, result: dict[str, Any]) -> None:
    for model in sorted({row["model"] for row in result.get("model", [])}):
        rows = [r for r in result["model"] if r["model"] == model]
        ax.plot(
            [r["batch"] for r in rows],
            [r["images_per_s"] for r in rows],
            "o--",
            label=f"{model} alone (img/s)",
        )
    sweep = result.get("pipeline_batch_sweep", [])
    if sweep:
        sizes = [r["batch_max_size"] for r in sweep]
        ax.plot(
            sizes,
            [r["listings_per_s"] for r in sweep],
            "s-",
            color="#c00000",
            label="pipeline (listings/s)",
        )
    noop = result.get("noop_drain")
    if noop:
        ax.axhline(
            noop["messages_per_s"],
            color="#555555",
            linestyle=":",
            label="no-op Celery, sent and drained (msg/s)",
        )
        if "worker_drain_per_s" in noop:
            ax.axhline(
                noop["worker_drain_per_s"],
                color="#999999",
                linestyle="--",
                label="no-op Celery, full queue drained (msg/s)",
            )
    if "peer" in result:
        ax.axhline(
            result["peer"]["listings_per_s"],
            color="#70ad47",
            linestyle="-.",
            label="peer loop (listings/s)",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (LV_BATCH_MAX_SIZE for the pipeline)")
    ax.set_ylabel("per second")
    ax.set_title("lv-toy: rates against batch size", fontsize=9)
    ax.legend(fontsize=7)


def _plot_latency(ax: Any, trickle: dict[str, Any] | None) -> None:
    ax.set_title("enqueue-to-commit latency under a trickle", fontsize=9)
    if not trickle or not trickle.get("latencies_ms"):
        return
    values = sorted(trickle["latencies_ms"])
    ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post")
    ax.axvline(50, color="#c00000", linestyle="--", label="target p95 50 ms")
    for name, colour in (("p50_ms", "#70ad47"), ("p95_ms", "#ed7d31"), ("p99_ms", "#7030a0")):
        label = f"{name[:3]} {trickle[name]:.0f} ms"
        ax.axvline(trickle[name], color=colour, linestyle=":", linewidth=1, label=label)
    ax.set_xlabel(f"ms ({trickle['events']} listings at {trickle['rate_per_s']:.0f}/s)")
    ax.set_ylabel("fraction of listings")
    ax.legend(fontsize=7, loc="lower right")


def _plot_simulated(
    ax: Any, rows: list[dict[str, Any]], pil_row: dict[str, Any] | None = None
) -> None:
    """One bar per simulated model (tensor input path), and the PIL path's bar where run."""
    ax.set_title("simulated accelerator: pipeline / model alone", fontsize=9)
    if not rows:
        return
    if pil_row is not None:
        rows = [*rows, {**pil_row, "simulated": f"{pil_row['simulated']}\n(PIL input path)"}]
    names = [r["simulated"] for r in rows]
    bars = ax.bar(names, [r["ratio_to_model_only"] for r in rows], color="#4472c4")
    for bar, row in zip(bars, rows, strict=True):
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            bar.get_height(),
            f"{row['listings_per_s']:,.0f} of\n{row['model_only_listings_per_s']:,.0f}/s",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.axhline(0.9, color="#c00000", linestyle="--", label="target for ViT-H-14-378 (0.9)")
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("ratio")
    ax.tick_params(axis="x", labelsize=7, labelrotation=15)
    ax.legend(fontsize=7)


def main() -> None:
    for name in sys.argv[1:]:
        path = Path(name)
        result = json.loads(path.read_text())
        plot = plot_runs if "reindex" in result else plot_throughput
        print(f"wrote {plot(result, path.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
