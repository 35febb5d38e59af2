"""What the pipeline reports when it ends: the summary (JSON, the last thing a job's log holds), the overview a
person reads (what was made, how training went, the score, where things are, what next) and the loss curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phi1_ray.pipeline.plan import Plan
from phi1_ray.pipeline.records import Stages, log


def _training(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("pretrain", "finetune"):
        if name in results:
            r = results[name]
            out[f"{name}_loss"] = [r.get("first_loss"), r.get("last_loss")]
            out[f"{name}_val_loss"] = [
                r.get("first_val_loss"),
                r.get("best_val_loss" if name == "finetune" else "last_val_loss"),
            ]
    if "finetune" in results:
        out["finetune_best_checkpoint"] = results["finetune"].get("best")
    if "tune" in results:
        out["tune"] = {k: results["tune"].get(k) for k in ("trials", "finished", "stopped_early", "best")}
    return out


def pipeline_summary(
    p: Plan, results: dict[str, dict[str, Any]], stages: Stages, curves: Path | None, run_id: str
) -> dict[str, Any]:
    summary: dict[str, Any] = {"run_dir": str(p.run_dir), "stages": stages.report}
    if "datagen" in results:
        summary["datagen"] = {**results["datagen"], **results.get("decontaminate", {})}
    if "data" in results:
        data = results["data"]
        summary.update(data_documents=data["documents"], data_tokens=data["tokens"], data_blocks=data["blocks"],
                       data_quarantined=data["quarantined"])  # fmt: skip
    summary.update(_training(results))
    summary["loss_curves"] = str(curves) if curves else None
    if "export" in results:
        summary.update(parameters=results["export"]["parameters"], hf_export=str(p.export_dir),
                       export_uri=results["export"]["uri"])  # fmt: skip
    if "evaluate" in results:
        ev = results["evaluate"]
        summary.update(generated_tokens=ev["generated_tokens"], generate_tokens_per_s=ev["generate_tokens_per_s"])
    summary.update(mlflow_uri=p.tracking_uri, mlflow_run_id=run_id)
    if "serve" in results:
        summary["serving"] = results["serve"]
    if "evaluate" in results:  # last: the summary ends with the score
        ev = results["evaluate"]
        summary["evaluation"] = {k: ev[k] for k in ("problems", "samples", "passed", "failed", "timed_out")}
        summary[f"{ev['benchmark']}_pass@1"] = ev["pass@1"]
    return summary


def _pair(values: list[Any] | None) -> str:
    if not values or values[0] is None:
        return "-"
    return " -> ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in values)


def print_overview(summary: dict[str, Any], export_dir: Path) -> None:
    """The summary a person reads: what was made, how training went, the score, where things are, what next."""
    lines = ["", "=" * 100, "phi1_ray pipeline: " + summary["run_dir"]]
    lines += [f"  {name:<14} {state}" for name, state in summary["stages"].items()]
    if "data_tokens" in summary:
        lines.append(f"  tokens prepared      {summary['data_tokens']:,} ({summary['data_documents']:,} documents)")
    for name in ("pretrain", "finetune"):
        if f"{name}_loss" in summary:
            lines.append(
                f"  {name} loss{' ' * (9 - len(name))}    train {_pair(summary[f'{name}_loss'])}, "
                f"validation {_pair(summary[f'{name}_val_loss'])}"
            )
    score = next((k for k in summary if k.endswith("_pass@1")), None)
    if score:
        ev = summary["evaluation"]
        lines.append(f"  {score:<20} {summary[score]:.3f} ({ev['passed']} of {ev['samples']} samples passed)")
    if summary.get("loss_curves"):
        lines.append(f"  loss curves          {summary['loss_curves']}")
    lines.append(f"  MLflow runs          {summary['mlflow_uri']} (run {summary['mlflow_run_id']})")
    if summary.get("hf_export"):
        lines.append(f"  exported model       {summary['hf_export']} (Hugging Face format)")
        lines.append(f"  serve it             serve run serve_apps.phi1:app_builder checkpoint={export_dir}")
    lines.append("=" * 100)
    print("\n".join(lines), flush=True)


def plot_losses(run_dir: Path, runs: dict[str, Path]) -> Path | None:
    """``loss_curves.png``: training and validation loss of each training stage against its step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("loss curves: matplotlib is not installed, no picture")
        return None
    runs = {name: path for name, path in runs.items() if (path / "metrics.jsonl").is_file()}
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5))
    for ax, (name, path) in zip(axes if len(runs) > 1 else [axes], runs.items()):
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        for key, style in (("loss", "-"), ("val_loss", "o-")):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), style, label=key, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    out = run_dir / "loss_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
