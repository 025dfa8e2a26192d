"""metrics.json's "route" summary of a router.json and the "Routing" section of report.md: the evaluation's
files show the route stage's results (finetune.route writes router.json; this module only reads it)."""

from __future__ import annotations

from finetune.evaluate.metrics import fmt, md_table

KEYS = ["small", "strong", "gap", "apgr", "cpt50", "cpt80", "best", "mean_quality", "note"]


def summary(router: dict) -> dict:
    """The parts of router.json that metrics.json and the report show (no curves)."""
    models = {}
    for name, r in router["routers"].items():
        models[name] = {
            "scorer": r["scorer"].get("signal") or "logistic", "escalate_below": r["escalate_below"],
            "choice": r["choice"].get("reason"),
            "validation": {k: r["validation"][k] for k in KEYS if k in r["validation"]},
            "test": {**{k: r["test"][k] for k in KEYS if k in r["test"]}, **r["test"]["at_threshold"]},
        }
    return {"strong": router["strong"]["spec"], "strong_few_shot": router["strong"]["few_shot"],
            "served": (router.get("served") or {}).get("small"), "target": router["target"], "models": models,
            "specialists": router.get("specialists", {})}


def routing_lines(route: dict, head: str) -> list[str]:
    """The report's Routing section."""
    target = route["target"]
    aim = (f"reach {head} >= {target['target_quality']} with the fewest escalations" if target.get("target_quality")
           is not None else f"the best {head} with at most {target['max_escalated']:.0%} of calls escalated")
    lines = ["## Routing", "",
             f"Strong model: `{route['strong']}` ({route['strong_few_shot']}-shot). Threshold chosen on the validation "
             f"rows to {aim}, escalating only where the gain holds in {target['min_confidence']:.0%} of paired "
             f"bootstrap resamples; measured below on the test rows. `router.json` holds the signals, weights, "
             f"threshold and both curves; `finetune-route` serves the GGUF router"
             + (f" (`{route['served']}`)." if route.get("served") else " (none here: no GGUF was routed)."), ""]
    rows = []
    for name, m in route["models"].items():
        t = m["test"]
        rows.append([name, m["scorer"], fmt(t["quality"]), f"{t['share_escalated']:.0%}", f"{t['calls_saved']:.0%}",
                     "—" if t.get("strong_tokens_saved") is None else f"{t['strong_tokens_saved']:.0%}",
                     fmt(t["small"]), fmt(t["strong"]), f"{fmt(t['best']['quality'])} at {t['best']['share']:.0%}",
                     fmt(t.get("apgr")), "—" if t.get("cpt50") is None else f"{t['cpt50']:.0%}",
                     "—" if t.get("cpt80") is None else f"{t['cpt80']:.0%}"])
    lines += md_table(["small model", "confidence", f"{head} routed", "escalated", "calls saved",
                       "strong tokens saved", "small alone", "strong alone", "best on curve", "APGR", "CPT(50%)",
                       "CPT(80%)"], rows) + [""]
    notes = sorted({m["test"]["note"] for m in route["models"].values() if m["test"].get("note")})
    lines += [f"- {n} (test rows)." for n in notes]
    lines += [f"- {name} ({s.get('baseline')}, no router): {head} {fmt(s['quality'])} on the same test rows."
              for name, s in route.get("specialists", {}).items()]
    lines += ["", "APGR: the share of the small-to-strong gap recovered, averaged over the share of calls escalated "
              "(RouteLLM); CPT(x%): the share of calls escalated that recovers x% of the gap.", "",
              "![routing](plots/route.png)", ""]
    return lines
