"""PNG plots: latency against depth per batch size, throughput against concurrency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter, LogFormatter

LATENCY_PNG = "latency_vs_depth.png"
THROUGHPUT_PNG = "throughput_vs_concurrency.png"
FAMILIES = (("imagenet", "ImageNet (224x224)"), ("cifar", "CIFAR-10 (32x32)"))


def _plain_log_ticks(ax: Axes) -> None:
    """Log-scale y ticks as plain numbers (20, 40) rather than powers of ten; minor ticks are
    labelled only where the axis spans few decades."""
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def latency_vs_depth(engine: dict[str, Any], out: Path) -> Path:
    """One panel per family; a line per batch size (p50, bars up to p90); torch dashed."""
    rows = engine["rows"]
    families = [(f, title) for f, title in FAMILIES if any(r.get("family") == f for r in rows)]
    fig, axes = plt.subplots(1, max(len(families), 1), figsize=(6 * max(len(families), 1), 4.5))
    axes = list(axes) if len(families) > 1 else [axes]
    for ax, (family, title) in zip(axes, families, strict=False):
        for color, batch in enumerate(sorted({r["batch_size"] for r in rows})):
            mine = sorted(
                (r for r in rows if r.get("family") == family and r["batch_size"] == batch),
                key=lambda r: r["depth"],
            )
            if not mine:
                continue
            depths = [r["depth"] for r in mine]
            p50 = [r["onnxruntime"]["p50_ms"] for r in mine]
            above = [r["onnxruntime"]["p90_ms"] - r["onnxruntime"]["p50_ms"] for r in mine]
            ax.errorbar(
                depths,
                p50,
                yerr=[[0] * len(p50), above],
                marker="o",
                color=f"C{color}",
                capsize=3,
                label=f"onnxruntime, batch {batch}",
            )
            if all("torch" in r for r in mine):
                ax.plot(
                    depths,
                    [r["torch"]["p50_ms"] for r in mine],
                    linestyle="--",
                    marker="x",
                    color=f"C{color}",
                    alpha=0.7,
                    label=f"PyTorch eager, batch {batch}",
                )
            ax.set_xticks(depths)
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_xlabel("depth (weighted layers)")
        ax.set_ylabel("latency per batch, p50 ms (bar: p90)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Latency per depth", fontsize=11)
    fig.tight_layout()
    path = out / LATENCY_PNG
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_vs_concurrency(http: dict[str, Any], out: Path) -> Path:
    """Closed loop: images/s and p50/p99 latency against concurrency (engine line if known)."""
    levels = sorted(http.get("closed", []), key=lambda lv: lv["concurrency"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    xs = [lv["concurrency"] for lv in levels]
    left.plot(xs, [lv["images_per_s"] for lv in levels], marker="o", label="HTTP")
    vs = http.get("vs_engine")
    if vs:
        left.axhline(
            vs["engine_images_per_s"],
            color="gray",
            linestyle="--",
            label=f"engine in process, batch {vs['engine_batch_size']}, with preprocessing",
        )
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent requests (closed loop)")
    left.set_ylabel("images/s")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    for q in ("p50", "p99"):
        right.plot(xs, [lv["latency"].get(f"{q}_ms") for lv in levels], marker="o", label=q)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    _plain_log_ticks(right)
    right.set_xlabel("concurrent requests (closed loop)")
    right.set_ylabel("request latency, ms")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{http.get('model')} over HTTP ({http.get('images_per_request')} images/request)")
    fig.tight_layout()
    path = out / THROUGHPUT_PNG
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PRECISION_PNG = "precision_vs_depth.png"


def precision_vs_depth(rows: list[dict[str, Any]], out: Path) -> Path:
    """`bench precision`: per family, latency per batch (from the exporter's images/s) against
    depth, fp32 solid and the precision `auto` chose dashed, a colour per batch size."""
    families = [(f, t) for f, t in FAMILIES if any(r["family"] == f for r in rows)]
    fig, axes = plt.subplots(1, max(len(families), 1), figsize=(6 * max(len(families), 1), 4.5))
    axes = list(axes) if len(families) > 1 else [axes]
    for ax, (family, title) in zip(axes, families, strict=False):
        mine = sorted((r for r in rows if r["family"] == family), key=lambda r: r["depth"])
        depths = [r["depth"] for r in mine]
        for color, batch in enumerate(mine[0]["batch_sizes"]):
            key = str(batch)
            for field, style, label in (
                ("fp32_images_per_s", "-", "fp32"),
                ("chosen_images_per_s", "--", "auto"),
            ):
                ms = [1e3 * batch / r[field][key] for r in mine]
                ax.plot(
                    depths,
                    ms,
                    linestyle=style,
                    marker="o",
                    color=f"C{color}",
                    label=f"{label}, batch {batch}",
                )
        for r in mine:
            ax.annotate(
                r["chosen"],
                (r["depth"], 1e3 / r["chosen_images_per_s"]["1"]),
                fontsize=6,
                rotation=30,
                alpha=0.7,
            )
        ax.set_xticks(depths)
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_xlabel("depth (weighted layers)")
        ax.set_ylabel("latency per batch, median ms")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("fp32 against the precision --precision auto chose (labels)", fontsize=11)
    fig.tight_layout()
    path = out / PRECISION_PNG
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
