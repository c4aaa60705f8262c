"""`compare --plot FILE.png`: precision-recall curves of mismatch detection (scale-free, so
cosine and SigLIP-style sigmoid models share the axes), each model's threshold in force and
best threshold marked, beside its speed. matplotlib is optional (`pip install matplotlib`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from listing_vision.toolkit.report import ModelReport


class PlotError(RuntimeError):
    """The plot cannot be drawn (matplotlib missing, or the file not writable)."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_comparison(reports: Sequence[ModelReport], out: Path, title: str) -> Path:
    """Write the figure to `out` (PNG) and return it."""
    plt = _pyplot()
    fig, (curves, speed) = plt.subplots(1, 2, figsize=(12, 5), width_ratios=(3, 2))
    for report in reports:
        if not report.curve:
            continue
        auc = "" if report.roc_auc is None else f", AUC {report.roc_auc:.3f}"
        recall, precision = zip(*report.curve, strict=True)
        (line,) = curves.step(recall, precision, where="post", label=f"{report.model_id}{auc}")
        for found, marker in ((report.at_threshold, "o"), (report.best, "*")):
            if found is not None:
                curves.plot(found.recall, found.precision, marker, color=line.get_color(), ms=9)
    curves.set(xlabel="recall (mismatches caught)", ylabel="precision (flags that are right)")
    curves.set(xlim=(0, 1.02), ylim=(0, 1.02), title="mismatch detection (o in force, * best)")
    curves.grid(alpha=0.3)
    curves.legend(loc="lower left", fontsize=8)
    ran = [r for r in reports if r.images_per_s]
    speed.barh([r.model_id for r in ran], [r.images_per_s or 0 for r in ran], color="#4472c4")
    speed.invert_yaxis()
    speed.set(xlabel="images/s (this machine)", title="throughput and peak memory")
    for index, report in enumerate(ran):
        memory = (report.peak_memory_bytes or 0) / 2**20
        speed.text(
            report.images_per_s or 0,
            index,
            f" {memory:,.0f} MB {report.memory_kind}",
            va="center",
            fontsize=8,
        )
    fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=110)
    except OSError as error:
        raise PlotError(f"cannot write {out}: {error.strerror}") from None
    finally:
        plt.close(fig)
    return out
