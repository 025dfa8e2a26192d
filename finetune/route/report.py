"""What the route stage adds to the run's results: plots/route.png, metrics.json's "route" summary and the
"Routing" section of report.md (both made by finetune.evaluate.routing)."""

from __future__ import annotations

from typing import Any

from finetune.core.config import Config
from finetune.core.files import write_json_atomic
from finetune.core.rundir import RunDir
from finetune.evaluate.metrics import read_json
from finetune.evaluate.routing import summary

def plot_route(router: dict, path: Any) -> Any:
    from finetune.evaluate.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, (name, r) in enumerate(router["routers"].items()):
        for split, style in (("test", "-"), ("validation", ":")):  # one colour per small model
            curve = r[split]["curve"]
            ax.plot([p["share"] for p in curve], [p["quality"] for p in curve], style, color=f"C{k}",
                    label=f"{name} ({split})")
        at = r["test"]["at_threshold"]
        ax.plot([at["share_escalated"]], [at["quality"]], "o", color="black")
        ax.annotate(f"chosen ({name})", (at["share_escalated"], at["quality"]), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))
    for name, s in router.get("specialists", {}).items():
        ax.plot([0], [s["quality"]], "*", markersize=10, label=f"{name}: {s.get('baseline')}")
    ax.set_xlabel(f"share of calls escalated to {router['strong']['spec']}")
    ax.set_ylabel(router["headline_metric"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def publish(cfg: Config, run: RunDir, router: dict) -> None:
    """Plot, then add the summary to metrics.json and re-render report.md (when the run has been evaluated)."""
    from finetune.evaluate.report import write_report

    run.plots_dir.mkdir(parents=True, exist_ok=True)
    plot_route(router, run.plots_dir / "route.png")
    metrics = read_json(run.metrics_path)
    if metrics is not None:
        metrics["route"] = summary(router)
        write_json_atomic(run.metrics_path, metrics)
        write_report(cfg, run, metrics)
