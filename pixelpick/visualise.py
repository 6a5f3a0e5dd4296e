"""Pictures of a round: the picked pixels over the image, beside the model's uncertainty map."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def _pyplot():
    """matplotlib's pyplot, headless (flows run on servers). Imported when a figure is drawn: it takes about 0.4 s,
    and the steps that draw nothing (every DVC stage but evaluate) start without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def query_panel(
    images: Sequence[np.ndarray],
    picks: Sequence[np.ndarray],
    scores: Sequence[np.ndarray | None],
    titles: Sequence[str],
) -> bytes:
    """A PNG with one row per image: the image with its picks (red rings), and the score map (brighter = more
    informative) when the round had a model."""
    rows, plt = len(images), _pyplot()
    fig, axes = plt.subplots(rows, 2, figsize=(7, 2.6 * rows), squeeze=False)
    for row, (image, yx, score, title) in enumerate(zip(images, picks, scores, titles)):
        left, right = axes[row]
        left.imshow(image)
        left.scatter(yx[:, 1], yx[:, 0], s=36, facecolors="none", edgecolors="red", linewidths=1.5)
        left.set_title(title, fontsize=8)
        if score is not None:
            right.imshow(score, cmap="magma")
            right.scatter(yx[:, 1], yx[:, 0], s=12, c="cyan", marker="x", linewidths=1)
            right.set_title("uncertainty (score)", fontsize=8)
        else:
            right.text(0.5, 0.5, "round 0: random picks", ha="center", va="center")
        for ax in (left, right):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    return buffer.getvalue()


def progress_plot(rows: Sequence[dict], title: str) -> bytes:
    """A PNG of mIoU (%) against labelled pixels per image, one point per evaluated round; rounds whose mIoU was not
    measured are left out (and said so when none was). Byte-identical for identical rows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    measured = [row for row in rows if row.get("miou") is not None]
    if measured:
        x = [row["labelled_per_image"] for row in measured]
        ax.plot(x, [100 * row["miou"] for row in measured], marker="o")
        for row, xi in zip(measured, x):
            ax.annotate(f"r{row['round']}", (xi, 100 * row["miou"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7)
    else:
        ax.text(0.5, 0.5, "mIoU not measured (no evaluation masks)", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("labelled pixels per image")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, metadata={"Software": None})  # no version stamp: same rows, same bytes
    plt.close(fig)
    return buffer.getvalue()
