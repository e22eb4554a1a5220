"""The demo's two pictures: `curves.png` (losses of every step, held-out accuracy where measured) and
`confusion.png` (per attribute, the value the captions name against the true one).

Loss curves of the two training stages are read from Lightning's CSV logs
(`<stage output_dir>/csv/version_*/metrics.csv`), the same files any run writes. Labels are English
glosses: the machines this runs on often have no font with Hangul.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from data.korean import VOCAB

GLOSS = {
    "빨간": "red", "파란": "blue", "초록": "green", "노란": "yellow",
    "원": "circle", "사각형": "square", "삼각형": "triangle",
    "왼쪽에서 오른쪽으로": "left→right", "오른쪽에서 왼쪽으로": "right→left",
    "위에서 아래로": "top→bottom", "아래에서 위로": "bottom→top", "none": "none",
}  # fmt: skip
ATTRS = tuple(VOCAB)  # color, shape, motion


def stage_losses(output_dir: str | Path) -> list[tuple[int, float]]:
    """(step, train/loss) rows of a stage's newest Lightning CSV log; [] when it has none."""
    logs = sorted(Path(output_dir).glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    if not logs:
        return []
    with open(logs[-1], newline="") as f:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]


def _smooth(ys: Sequence[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def plot_curves(
    path: Path,
    warmups: Mapping[str, Sequence[float]],
    stages: Mapping[str, Sequence[tuple[int, float]]],
    accuracy: Mapping[str, Mapping[str, float]],
) -> Path:
    """Warm-up losses, stage losses (stage 2 continues stage 1's step axis), and accuracy per attribute
    at each point where it was measured (`accuracy`: {point name: {attribute or "all": value}})."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=80)
    ax = axes[0]
    for name, ys in warmups.items():
        if ys:
            ax.plot(range(len(ys)), _smooth(list(ys), 10), label=f"{name} warm-up")
    ax.set(title="warm-ups (10-step mean)", xlabel="step", ylabel="loss", yscale="log")
    ax.legend()
    ax, offset = axes[1], 0
    for name, rows in stages.items():
        if rows:
            ax.plot([offset + s for s, _ in rows], [v for _, v in rows], marker=".", label=name)
            offset += rows[-1][0] + 1
    ax.set(
        title="caption loss (labelled tokens)",
        xlabel="step (stage 2 after stage 1)",
        ylabel="loss",
        yscale="log",
    )
    ax.legend()
    ax = axes[2]
    points = list(accuracy)
    keys = [*ATTRS, "all"]
    for k in keys:
        xs = [i for i, p in enumerate(points) if k in accuracy[p]]
        ax.plot(xs, [accuracy[points[i]][k] for i in xs], marker="o", label=k, lw=2.5 if k == "all" else 1.2)
    ax.set_xticks(range(len(points)), [p.replace(" (", "\n(") for p in points], fontsize=8)
    ax.axhline(0.9, color="k", ls="--", lw=0.8)
    ax.set(title="held-out accuracy", ylim=(0, 1.02), ylabel="accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(path: Path, matrices: Mapping[str, Mapping[str, Any]], title: str = "") -> Path:
    """One heat map per attribute: rows the true value, columns the value the caption names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(5.2 * len(matrices), 4.4), dpi=80)
    for ax, (attr, m) in zip(axes, matrices.items(), strict=True):
        counts, cols = m["counts"], m["values"]
        rows = cols[: len(counts)]
        ax.imshow(counts, cmap="Blues")
        for i, row in enumerate(counts):
            for j, c in enumerate(row):
                ax.text(
                    j,
                    i,
                    str(c),
                    ha="center",
                    va="center",
                    color="w" if c > max(map(max, counts)) / 2 else "k",
                )
        ax.set_xticks(range(len(cols)), [GLOSS.get(c, c) for c in cols], rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), [GLOSS.get(r, r) for r in rows], fontsize=8)
        right = sum(counts[i][i] for i in range(len(rows)))
        ax.set(
            title=f"{attr}: {right}/{sum(map(sum, counts))} right", xlabel="named in caption", ylabel="true"
        )
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
