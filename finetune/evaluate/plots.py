"""The report's plots: loss curves and the confusion matrix (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(history: list[dict], path: Path) -> Path | None:
    train = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    val = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e]
    if not train and not val:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label, style in ((train, "training loss", "-"), (val, "validation loss", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(predictions: list[dict], labels: list[str], title: str, path: Path) -> Path | None:
    if not predictions:
        return None
    other = "(other)"
    names = list(labels) or sorted({str(p["reference"]) for p in predictions})
    names = names + [other]
    index = {n: i for i, n in enumerate(names)}
    counts = [[0] * len(names) for _ in names]
    for p in predictions:
        truth = index.get(str(p["reference"]), index[other])
        guess = index.get(str(p.get("parsed")), index[other])
        counts[truth][guess] += 1
    plt = pyplot()
    size = 2 + 0.5 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("expected")
    ax.set_title(title)
    for i, row in enumerate(counts):
        for j, c in enumerate(row):
            if c:
                ax.text(j, i, str(c), ha="center", va="center", color="black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
