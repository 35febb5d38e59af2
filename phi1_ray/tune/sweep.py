"""Ray Tune sweeps over the finetuning config: every trial is a full Ray Train finetuning run.

Train V2 inside Tune: each trial is a Tune *function* trainable that builds its finetuning config (the base config,
the sweep's overrides, the trial's sampled values) and calls :func:`phi1_ray.train.run.run_training`, whose
``TorchTrainer`` gets Tune's ``TuneReportCallback``: every checkpoint's metrics (with the validation loss) reach
Tune, so ASHA can stop a trial early. A trial that finishes reports once more (its best validation loss and, when
the objective asks for it, HumanEval pass@1 of its best checkpoint).

Outputs under ``run_dir``: ``results.csv`` (trials sorted by objective), ``sweep.png`` (objective against the
learning rate and one more searched key), ``best.yaml`` (the best trial's finetuning config, ready to run),
``best_hf/`` (its best checkpoint as a Hugging Face directory), ``trials/<trial>/`` (each trial's run directory),
``tune/<name>/`` (Tune's experiment state, for resuming) and the MLflow store (one parent run, a child per trial).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from phi1_ray import storage
from phi1_ray.config import build, read_yaml, set_dotted, to_yaml
from phi1_ray.errors import ConfigError, Phi1Error
from phi1_ray.tracking import PARENT_TAG, TrackedRun, try_log
from phi1_ray.train.config import TrainJobConfig
from phi1_ray.tune.config import SearchDim, TuneJobConfig

DONE_KEY = "trial_finished"


class SweepInterrupted(Phi1Error):
    """The sweep was stopped (Ctrl-C) before every trial ended: its state is kept for resuming."""


def log(msg: str) -> None:
    print(f"[tune] {msg}", flush=True)


def base_job(cfg: TuneJobConfig) -> dict[str, Any]:
    """The base finetuning config with the sweep's overrides, as a plain dict (validated)."""
    data = read_yaml(cfg.base)
    for key, value in cfg.overrides.items():
        try:
            set_dotted(data, key, value)
        except ConfigError as exc:
            raise ConfigError(f"overrides.{exc}") from None
    data["job"] = "finetune"
    build(TrainJobConfig, data, source=f"{cfg.base} with the sweep's overrides")
    return _absolute_inputs(data)


def _absolute_inputs(data: dict[str, Any]) -> dict[str, Any]:
    """The job's input paths made absolute: each trial runs in a working directory of its own, where a path
    relative to the sweep's would mean nothing."""
    for key in ("init_from", "prepared", "storage_path"):
        if isinstance(data.get(key), str):
            data[key] = storage.absolute_if_local(data[key])
    section = data.get("data")
    if isinstance(section, dict):
        if isinstance(section.get("tokenizer"), str):
            section["tokenizer"] = storage.absolute_if_local(section["tokenizer"])
        for source in section.get("sources") or []:
            if isinstance(source, dict) and isinstance(source.get("paths"), list):
                source["paths"] = [storage.absolute_if_local(p) if isinstance(p, str) else p for p in source["paths"]]
    return data


def _probe_values(dim: SearchDim) -> list[Any]:
    if dim.type in ("choice", "grid"):
        return list(dim.values or [])
    if dim.type == "randint":
        return [int(dim.low), int(dim.high) - 1]
    return [dim.low, dim.high]


def check_space(cfg: TuneJobConfig, base: dict[str, Any]) -> None:
    """Every searched key exists in the finetuning config and every value it may take validates: before any trial."""
    for key, dim in cfg.space.items():
        for value in _probe_values(dim):
            data = copy.deepcopy(base)
            try:
                set_dotted(data, key, value)
                build(TrainJobConfig, data)
            except ConfigError as exc:
                detail = str(exc).replace("invalid config:\n  ", "")
                raise ConfigError(f"space.{key} (value {value!r}): {detail}") from None


def tune_domain(dim: SearchDim) -> Any:
    from ray import tune

    if dim.type == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    if dim.type == "uniform":
        return tune.uniform(dim.low, dim.high)
    if dim.type == "randint":
        return tune.randint(int(dim.low), int(dim.high))
    if dim.type == "choice":
        return tune.choice(dim.values)
    return tune.grid_search(dim.values)


def reports_per_trial(job: TrainJobConfig) -> int:
    """Checkpoints (so Tune reports) a full trial makes: the ASHA time axis."""
    return max(1, math.ceil(job.optim.max_steps / job.train.checkpoint_every))


# -- one trial ---------------------------------------------------------------------------------------------------


def _trial(config: dict[str, Any]) -> None:
    """A Tune function trainable: one finetuning run (Ray Train + DeepSpeed) for the sampled values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from phi1_ray.train.run import run_training

    sweep = config["sweep"]
    trial = tune.get_context().get_trial_id()
    trial_dir = Path(sweep["run_dir"]) / "trials" / trial
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "starts.log", "a") as f:  # one line per start: a resumed sweep must not rerun finished ones
        f.write("start\n")
    data = copy.deepcopy(config["base"])
    for key, value in config["params"].items():
        set_dotted(data, key, value)
    data.update(run_dir=str(trial_dir), name=trial, export=False)
    data["mlflow"] = dict(sweep["mlflow"])
    job = build(TrainJobConfig, data)
    tags = {PARENT_TAG: sweep["parent_run_id"], "phi1_ray.trial": trial} if sweep["parent_run_id"] else {}
    summary = run_training(job, log=print, callbacks=[TuneReportCallback()], mlflow_tags=tags)
    final: dict[str, Any] = {
        DONE_KEY: 1,
        "best_val_loss": summary.get("best_val_loss"),
        "val_loss": summary.get("last_val_loss"),
        "steps": summary.get("steps"),
        "best_checkpoint": summary.get("best") or summary.get("latest"),
    }
    objective = sweep["objective"]
    if objective["metric"] == "pass@1" and final["best_checkpoint"]:
        from phi1_ray.evals.generation import EvalSampling
        from phi1_ray.evals.run import evaluate

        scores = evaluate(
            objective["benchmark"],
            trial_dir / "eval",
            checkpoint=final["best_checkpoint"],
            sampling=EvalSampling(n=1, temperature=0.0, max_new_tokens=objective["max_new_tokens"]),
            limit=objective["limit"],
            mlflow_run_id=summary.get("mlflow_run_id"),
            tracking_uri=summary.get("tracking_uri"),
            log=print,
        )
        final["pass@1"] = scores["pass@1"]
    (trial_dir / "summary.json").write_text(json.dumps({**summary, **final}, indent=2, default=str) + "\n")
    tune.report(final)


# -- the sweep ---------------------------------------------------------------------------------------------------


def _parent_run(cfg: TuneJobConfig, run_dir: Path, uri: str) -> str | None:
    """The sweep's MLflow parent run (the same one when a sweep resumes)."""
    from phi1_ray.tracking import start_run

    run = start_run(uri, cfg.mlflow.experiment, run_dir, cfg.name, {"phi1_ray.job": "tune"}, cfg, "no runs logged")
    return run.run_id if run else None


def _log_results(cfg: TuneJobConfig, parent: TrackedRun, best: dict[str, Any], files: list[Any]) -> None:
    """The best trial's objective and the sweep's files on the parent run."""

    def send() -> None:
        value = best.get("best_val_loss" if cfg.objective.metric == "val_loss" else "pass@1")
        if value is not None:
            parent.log_metric(f"best_{cfg.objective.metric}", float(value))
        for path in files:
            if path is not None and Path(path).is_file():
                parent.log_artifact(path)

    try_log("the sweep's results", send, log=log)


def _shared_data(job: TrainJobConfig, run_dir: Path) -> tuple[str, str]:
    """Prepare the finetuning data once for every trial: (tokenizer path, prepared directory)."""
    from phi1_ray.data.ray_pipeline import prepare
    from phi1_ray.train.run import tokenizer_for

    tokenizer = tokenizer_for(job, run_dir, log)
    data_dir = run_dir / "data"
    if job.prepared:
        return tokenizer, job.prepared
    if (data_dir / "manifest.json").is_file():
        log(f"data: {data_dir} exists, skipped")
    else:
        prepare(job.data.model_copy(update={"tokenizer": tokenizer}), str(data_dir), log=log)
    return tokenizer, str(data_dir)


def _searcher(cfg: TuneJobConfig) -> Any:
    """Optuna's TPE when asked (and installed), else Tune's random / grid search, seeded."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if cfg.searcher != "optuna":
        return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials)
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("searcher: optuna is not installed (pip install optuna), or use searcher: random") from None
    metric = "best_val_loss" if cfg.objective.metric == "val_loss" else "pass@1"
    return OptunaSearch(metric=metric, mode="min" if metric == "best_val_loss" else "max", seed=cfg.seed)


def _scheduler(cfg: TuneJobConfig, max_t: int) -> Any:
    """ASHA on validation loss over a trial's ``max_t`` reports, or FIFO (every trial runs to its end)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.scheduler.type != "asha":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        metric="val_loss",
        mode="min",
        max_t=max_t,
        grace_period=min(cfg.scheduler.grace_period, max_t),
        reduction_factor=cfg.scheduler.reduction_factor,
    )


def _tuner(cfg: TuneJobConfig, run_dir: Path, param_space: dict[str, Any], max_t: int, resume: bool) -> Any:
    """A new Tuner, or the sweep's saved one restored (its finished trials kept, ASHA's rungs too)."""
    from ray import tune

    from phi1_ray.tune.scheduler_state import SchedulerState, restore_scheduler

    # the trial itself only waits on its TorchTrainer: its workers (and their GPUs) hold the real resources
    trainable = tune.with_resources(_trial, {"CPU": 0.05})
    storage = str(run_dir / "tune")
    experiment = Path(storage) / cfg.name
    scheduler_state = run_dir / "scheduler_state.pkl"
    if tune.Tuner.can_restore(str(experiment)):
        log(f"resuming the sweep in {experiment}: finished trials are kept, the others run")
        tuner = tune.Tuner.restore(
            str(experiment), trainable, resume_unfinished=True, resume_errored=True, param_space=param_space
        )
        restore_scheduler(tuner, scheduler_state, log)
        return tuner
    if resume:
        raise ConfigError(f"--resume: no sweep to resume in {experiment}")
    scheduler = _scheduler(cfg, max_t)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=_searcher(cfg),
            scheduler=scheduler,
            num_samples=cfg.num_samples,
            max_concurrent_trials=cfg.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=storage, verbose=1, callbacks=[SchedulerState(scheduler, scheduler_state)]
        ),
    )


def _fit(tuner: Any, experiment: Path) -> Any:
    """Run the trials; a SweepInterrupted (resume by running the same command) when some did not end."""
    from ray import tune

    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        raise SweepInterrupted("the sweep was interrupted; run the same command again to resume it") from None
    # Tune ends the run on Ctrl-C after saving the experiment's state; the saved state, read back, says which
    # trials had not ended (the returned grid counts them as terminated: they were stopped on the way out).
    saved = tune.ExperimentAnalysis(str(experiment)).trials
    unfinished = [t for t in saved if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:
        raise SweepInterrupted(
            f"the sweep stopped with {len(unfinished)} trial(s) unfinished; run the same command again to resume it"
        )
    return grid


def run_sweep(cfg: TuneJobConfig, resume: bool = False) -> dict[str, Any]:
    from phi1_ray.runtime import init_ray
    from phi1_ray.tracking import tracking_uri
    from phi1_ray.train.run import check

    run_dir = Path(cfg.run_dir).resolve()
    base = base_job(cfg)
    check_space(cfg, base)
    probe = check(build(TrainJobConfig, {**base, "run_dir": str(run_dir / "trials" / "probe")}))
    _searcher(cfg)  # a missing optional searcher fails before anything starts
    run_dir.mkdir(parents=True, exist_ok=True)

    per_trial_cpus = probe.train.num_workers * (probe.train.resources_per_worker or {}).get("CPU", 1)
    init_ray(cfg.ray, min_cpus=int(math.ceil(cfg.max_concurrent_trials * per_trial_cpus)) + 2)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(cfg.mlflow, run_dir)
    parent = _parent_run(cfg, run_dir, uri)
    if not any(key.startswith("data.") for key in cfg.space):  # one preparation serves every trial
        tokenizer, prepared = _shared_data(probe, run_dir)
        base["prepared"] = prepared
        base.setdefault("data", {})["tokenizer"] = tokenizer

    max_t = reports_per_trial(probe) + 1  # + the finished trial's own report
    sweep = {
        "run_dir": str(run_dir),
        "parent_run_id": parent,
        "mlflow": {"tracking_uri": uri, "experiment": cfg.mlflow.experiment},
        "objective": cfg.objective.model_dump(mode="json"),
    }
    param_space = {"params": {k: tune_domain(d) for k, d in cfg.space.items()}, "base": base, "sweep": sweep}
    tuner = _tuner(cfg, run_dir, param_space, max_t, resume)
    log(
        f"{cfg.num_samples} trials of {cfg.base} ({len(cfg.space)} keys searched), {cfg.max_concurrent_trials} at "
        f"a time, {cfg.scheduler.type} on val_loss over {max_t} reports, objective {cfg.objective.metric} -> {run_dir}"
    )
    experiment = run_dir / "tune" / cfg.name
    rows = _rows(_fit(tuner, experiment), cfg)
    if not rows:
        raise Phi1Error(f"no trial of the sweep finished; see {experiment}")
    return _write_results(cfg, run_dir, rows, uri, parent)


def _rows(grid: Any, cfg: TuneJobConfig) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        params = (result.config or {}).get("params", {})
        finished = bool(metrics.get(DONE_KEY))
        row: dict[str, Any] = {
            "trial": metrics.get("trial_id") or (result.config or {}).get("trial_id"),
            "status": "error" if result.error else "finished" if finished else "stopped early",
            "reports": metrics.get("training_iteration", 0) - (1 if finished else 0),
            "last_step": metrics.get("steps") if finished else metrics.get("step"),
            "best_val_loss": metrics.get("best_val_loss") if finished else _best_reported(result),
            "last_val_loss": metrics.get("val_loss"),
            "pass@1": metrics.get("pass@1"),
            "best_checkpoint": metrics.get("best_checkpoint"),
            **{f"param.{k}": v for k, v in params.items()},
        }
        rows.append(row)
    key = "best_val_loss" if cfg.objective.metric == "val_loss" else "pass@1"
    sign = 1 if key == "best_val_loss" else -1

    def order(row: dict[str, Any]) -> tuple:
        value = row.get(key)
        finished = row["status"] == "finished"
        return (not finished, value is None, sign * value if value is not None else 0.0)

    return sorted(rows, key=order)


def _best_reported(result: Any) -> float | None:
    frame = getattr(result, "metrics_dataframe", None)
    if frame is None or "val_loss" not in frame:
        return None
    values = [v for v in frame["val_loss"].tolist() if v == v]
    return min(values) if values else None


def _write_results(
    cfg: TuneJobConfig, run_dir: Path, rows: list[dict[str, Any]], uri: str, parent: str | None
) -> dict[str, Any]:
    from phi1_ray.train.run import export

    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in columns if c != "best_checkpoint"]
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in shown}
    lines = ["  ".join(c.ljust(widths[c]) for c in shown)]
    lines += ["  ".join(_cell(r.get(c)).ljust(widths[c]) for c in shown) for r in rows]
    log("results (best first):\n" + "\n".join(lines))

    best = next((r for r in rows if r["status"] == "finished"), None)
    if best is None:
        raise Phi1Error("no trial finished (all were stopped early or failed); see results.csv")
    data = json.loads((Path(run_dir) / "trials" / best["trial"] / "summary.json").read_text())
    best_job = _best_job(cfg, best)
    (run_dir / "best.yaml").write_text(
        f"# the best trial of the sweep {cfg.name} ({best['trial']}); run it with\n"
        f"#   python jobs/finetune.py --config {run_dir / 'best.yaml'}\n" + to_yaml(best_job)
    )
    hf = export(best["best_checkpoint"], run_dir / "best_hf", uri, parent, log) if best["best_checkpoint"] else None
    plot = _plot(cfg, rows, run_dir / "sweep.png")
    if parent:
        _log_results(cfg, TrackedRun(uri, parent), best, [run_dir / "results.csv", run_dir / "best.yaml", plot])
    summary = {
        "run_dir": str(run_dir),
        "trials": len(rows),
        "finished": sum(r["status"] == "finished" for r in rows),
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "best_trial": best["trial"],
        "best": {k: v for k, v in best.items() if k.startswith("param.") or k in ("best_val_loss", "pass@1")},
        "best_config": str(run_dir / "best.yaml"),
        "best_hf": str(hf) if hf else None,
        "best_steps": data.get("steps"),
        "results": str(run_dir / "results.csv"),
        "plot": str(plot) if plot else None,
        "mlflow_uri": uri,
        "mlflow_parent_run_id": parent,
    }
    log("summary:\n" + json.dumps(summary, indent=2, default=str))
    return summary


def _best_job(cfg: TuneJobConfig, best: dict[str, Any]) -> TrainJobConfig:
    data = base_job(cfg)
    for key, value in best.items():
        if key.startswith("param."):
            set_dotted(data, key.removeprefix("param."), value)
    data["run_dir"] = str(Path(cfg.run_dir).resolve() / "best-finetune")
    return build(TrainJobConfig, data)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _plot(cfg: TuneJobConfig, rows: list[dict[str, Any]], out: Path) -> Path | None:
    """The objective against the learning rate (when searched) and one more numeric searched key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "best_val_loss" if cfg.objective.metric == "val_loss" else "pass@1"
    numeric = [
        k for k in cfg.space if all(isinstance(r.get(f"param.{k}"), (int, float)) for r in rows if f"param.{k}" in r)
    ]
    keys = (["optim.lr"] if "optim.lr" in numeric else []) + [k for k in numeric if k != "optim.lr"]
    keys = keys[:2]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for status, marker in (("finished", "o"), ("stopped early", "x")):
            points = [
                (r[f"param.{key}"], r[metric]) for r in rows if r["status"] == status and r.get(metric) is not None
            ]
            if points:
                ax.scatter(*zip(*points), marker=marker, label=status)
        if key == "optim.lr" or cfg.space[key].type == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.legend()
    fig.suptitle(f"sweep {cfg.name}: {metric} per trial")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
