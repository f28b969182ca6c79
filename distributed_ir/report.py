"""Run report: ``report.md`` with training curves and a metrics bar chart (PNG, matplotlib Agg).

``write_report(out_dir, metrics, history, reranker_history)``:

- ``metrics``: the pipeline's ``metrics.json`` dict (rows under ``"metrics"``) or the rows
  themselves, ``{"base": {...}, "finetuned": {...}, "reranked": {...}, "fused": {...}}``;
  whichever rows exist are plotted side by side for every retrieval metric they share.
- ``history``: the training loop's logged steps (``train_loop`` returns them as
  ``{"history": [{"step", "loss", "lr", ...}, ...]}``), plotted as loss and learning rate
  against the optimizer step.
- ``reranker_history``: the same for the pipeline's reranker (a second PNG), with a
  "Reranker" section from ``metrics["reranker_mining"]``, ``["reranker_train"]`` and ``["rerank"]``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

ROW_ORDER = ("base", "finetuned", "reranked", "fused")
LOSS_PNG = "training_curves.png"
RERANKER_LOSS_PNG = "reranker_training_curves.png"
METRICS_PNG = "metrics.png"


def _rows(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    rows = metrics.get("metrics", metrics)
    named = [k for k in ROW_ORDER if isinstance(rows.get(k), dict)]
    others = [k for k, v in rows.items() if isinstance(v, dict) and k not in ROW_ORDER and k != "config"]
    return {k: {m: float(v) for m, v in rows[k].items() if _number(v)} for k in named + others}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _retrieval_metrics(rows: dict[str, dict[str, float]]) -> list[str]:
    """Metric names shared by every row that look like ``name@k`` (scores in [0, 1])."""
    names = [m for m in next(iter(rows.values()), {}) if "@" in m]
    return [m for m in names if all(m in r for r in rows.values())]


def plot_history(history: list[dict[str, Any]], path: Path, title: str = "Training") -> Path:
    """Loss and learning rate against optimizer step, two stacked panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax_loss.plot(steps, [h["loss"] for h in history], marker="o", markersize=3, color="tab:blue")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title(title)
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [h["lr"] for h in history], marker="o", markersize=3, color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metrics(rows: dict[str, dict[str, float]], names: list[str], path: Path) -> Path:
    """Grouped bars: one group per metric, one bar per model row, values printed on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(names), 4.5))
    width = 0.8 / len(rows)
    for i, (row, values) in enumerate(rows.items()):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, [values[m] for m in names], width, label=row)
        ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, min(1.0, max(v[m] for v in rows.values() for m in names) * 1.2 + 0.05))
    ax.set_ylabel("score")
    ax.set_title("Retrieval quality")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _logged_steps(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [h for h in history if all(_number(h.get(k)) for k in ("step", "loss", "lr"))]


def _steps_line(steps: list[dict[str, Any]]) -> str:
    first, last = steps[0], steps[-1]
    return (f"{len(steps)} logged steps, step {first['step']} to {last['step']}: loss {first['loss']:.4f} -> "
            f"{last['loss']:.4f}, learning rate {first['lr']:.2e} -> {last['lr']:.2e}.")


def _reranker_section(metrics: dict[str, Any], history: list[dict[str, Any]], out: Path) -> list[str]:
    mining, train, rerank = (metrics.get(k) or {} for k in ("reranker_mining", "reranker_train", "rerank"))
    lines = ["## Reranker", ""]
    if train.get("task"):
        lines.append(f"A {train['task']} trained on {train.get('records', '?')} records mined with the fine-tuned "
                     "model.")
    if mining:
        lines.append("Mining: " + ", ".join(f"{k} {v}" for k, v in mining.items() if _number(v)) + ".")
    if _number(train.get("seconds")):
        lines.append(f"Reranker training took {train['seconds']:.0f} s.")
    if _number(rerank.get("pairs_per_s")):
        lines.append(f"Reranking: top {rerank.get('top_k', '?')} per query, {rerank.get('pairs', '?')} pairs at "
                     f"{rerank['pairs_per_s']:.1f} pairs/s on {rerank.get('actors', '?')} actors"
                     + (f"; fused with weight {rerank['fusion_weight']}" if "fusion_weight" in rerank else "")
                     + f". The reranked rows hold only those {rerank.get('top_k', '?')} documents per query: "
                     "recall and map beyond that depth are cut.")
    steps = _logged_steps(history)
    if steps:
        lines.append(_steps_line(steps))
        plot_history(steps, out / RERANKER_LOSS_PNG, "Reranker training")
        lines += ["", f"![reranker training loss and learning rate]({RERANKER_LOSS_PNG})"]
    return lines + [""]


def write_report(out_dir: str | Path, metrics: dict[str, Any], history: list[dict[str, Any]],
                 reranker_history: list[dict[str, Any]] | None = None) -> Path:
    """Write ``report.md`` and its PNG plots into ``out_dir``; returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(metrics)
    names = _retrieval_metrics(rows)
    lines = ["# Run report", ""]
    if metrics.get("finished"):
        lines += [f"Finished {metrics['finished']}.", ""]
    lines += ["## Retrieval quality", ""]
    if rows and names:
        lines += ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [f"| {row} | " + " | ".join(f"{v[m]:.4f}" for m in names) + " |" for row, v in rows.items()]
        for base, other in (("base", "finetuned"), ("finetuned", "hybrid"), ("finetuned", "reranked"),
                            ("finetuned", "fused")):
            if base in rows and other in rows:
                lines.append(f"\n{other} vs {base}: " + ", ".join(
                    f"{m} {rows[other][m] - rows[base][m]:+.4f}" for m in names))
        plot_metrics(rows, names, out / METRICS_PNG)
        lines += ["", f"![retrieval metrics]({METRICS_PNG})", ""]
    else:
        lines += ["No retrieval metrics were given.", ""]
    lines += ["## Training", ""]
    steps = _logged_steps(history)
    if steps:
        lines.append(_steps_line(steps))
        train = metrics.get("train") or {}
        if _number(train.get("seconds")):
            lines.append(f"Training took {train['seconds']:.0f} s on {train.get('records', '?')} records.")
        distill = metrics.get("distill") or {}
        if distill:
            lines.append(f"Distillation: the teacher {distill.get('teacher', '?')} scored "
                         f"{distill.get('scored_records', '?')} records ({distill.get('pairs', '?')} pairs at "
                         f"{distill.get('pairs_per_s', '?')} pairs/s); {distill.get('kept_scores', 0)} kept their given "
                         f"scores, {distill.get('dropped_without_negatives', 0)} without negatives were dropped.")
        plot_history(steps, out / LOSS_PNG)
        lines += ["", f"![training loss and learning rate]({LOSS_PNG})", ""]
    else:
        lines += ["No training history was recorded.", ""]
    if reranker_history or any(metrics.get(k) for k in ("reranker_mining", "reranker_train", "rerank")):
        lines += _reranker_section(metrics, reranker_history or [], out)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
