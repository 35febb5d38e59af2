"""The pipeline's stage bookkeeping (skip, rerun, resume, stale outputs) and its configs at every size, without Ray:
the end-to-end runs are in test_pipeline.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phi1_ray.config import build, read_yaml
from phi1_ray.errors import ConfigError
from phi1_ray.pipeline import STAGES, Stage, Stages, plan
from phi1_ray.pipeline.config import PipelineConfig
from tests.conftest import ROOT


class Chain:
    """Three toy stages a -> b -> c, each writing one file; counts the runs of each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: dict[str, int] = {}
        self.fail: str | None = None
        self.settings = {"a": 1, "b": 1, "c": 1}

    def stage(self, name: str, deps: tuple[str, ...]) -> Stage:
        out = self.root / f"{name}.out"

        def run() -> dict:
            self.runs[name] = self.runs.get(name, 0) + 1
            partial = out.with_suffix(".partial")
            resumed = partial.is_file()
            partial.write_text("half")
            if self.fail == name:
                raise RuntimeError(f"{name} was interrupted")
            out.write_text(name)
            partial.unlink()
            return {"made": str(out), "resumed": resumed}

        return Stage(name, deps, [str(out)], {"v": self.settings[name]}, run)

    def run_all(self, rerun: set[str] = frozenset()) -> Stages:
        stages = Stages(self.root, rerun=set(rerun))
        for name, deps in (("a", ()), ("b", ("a",)), ("c", ("b",))):
            stages.run(self.stage(name, deps))
        return stages


def test_stages_skip_finished_rerun_after_deleted_output_and_resume_interrupted(tmp_path, capsys):
    chain = Chain(tmp_path)
    first = chain.run_all()
    assert chain.runs == {"a": 1, "b": 1, "c": 1} and set(first.report.values()) == {"ran in 0.0 s"}

    second = chain.run_all()  # nothing changed: every stage skipped, with a line saying so
    assert chain.runs == {"a": 1, "b": 1, "c": 1} and set(second.report.values()) == {"skipped"}
    assert capsys.readouterr().out.count("finished earlier") == 3
    assert second.ids == first.ids

    (tmp_path / "b.out").unlink()  # one stage's output deleted: it and the stages after it run, not the ones before
    third = chain.run_all()
    assert chain.runs == {"a": 1, "b": 2, "c": 2}
    assert third.report["a"] == "skipped" and third.ids["a"] == first.ids["a"] and third.ids["b"] != first.ids["b"]
    out = capsys.readouterr().out
    assert "b: running (" in out and "b.out missing" in out and "c: running (b changed since it ran)" in out
    assert "c: removing" in out  # the stale output of the later stage goes before it runs again

    chain.settings["a"] = 2  # a stage's settings changed: it and everything after it run
    chain.run_all()
    assert chain.runs == {"a": 2, "b": 3, "c": 3}
    assert "a: running (its settings changed)" in capsys.readouterr().out

    chain.run_all(rerun={"b"})  # rerun= one stage: it and the later ones
    assert chain.runs == {"a": 2, "b": 4, "c": 4}

    chain.fail = "c"  # interrupted mid-stage: the record says running; the next run resumes, keeping its files
    with pytest.raises(RuntimeError):
        chain.run_all(rerun={"c"})
    assert json.loads((tmp_path / "stages" / "c.json").read_text())["status"] == "running"
    chain.fail = None
    resumed = chain.run_all()
    assert "c: running (interrupted last time, resuming)" in capsys.readouterr().out
    assert resumed.report["a"] == resumed.report["b"] == "skipped"
    assert json.loads((tmp_path / "stages" / "c.json").read_text())["summary"]["resumed"] is True


def _plan(name: str, **changes):
    data = read_yaml(ROOT / "configs" / "pipeline" / f"{name}.yaml")
    data.update(changes)
    return plan(build(PipelineConfig, data, source=name))


def test_demo_and_cluster_configs_resolve_to_the_same_stages(tmp_path):
    demo = _plan("demo", run_dir=str(tmp_path / "demo"))
    assert demo.store == str(tmp_path / "demo") and demo.ckpt_root is None and demo.export_uri.endswith("/export")
    assert all(demo.on[s] for s in STAGES if s != "tune")
    for name, model, params in (("phi-1", "phi-1", "1.3B"), ("phi-1-small", "phi-1-small", "350M")):
        p = _plan(name, run_dir=str(tmp_path / name))
        assert p.on == demo.on, name  # the same stages: only the settings differ
        pre, fine = p.jobs["pretrain"], p.jobs["finetune"]
        assert p.store.startswith("s3://") and p.export_uri == f"{p.store}/export"
        for job in (pre, fine):
            assert job.model.name == model and job.model.n_layer == (24 if model == "phi-1" else 20), params
            assert job.train.use_gpu and job.train.precision == "fp16" and job.train.num_workers == 8
            assert job.storage_path == f"{p.store}/checkpoints" and job.data.tokenizer == "microsoft/phi-1"
            assert job.data.seq_len == 2048
        assert pre.train.effective_batch == 1024 and fine.train.effective_batch == 256  # the paper's batches
        assert pre.prepared == f"{p.store}/data"  # prepared once by the data stage, on shared storage
        assert fine.init_from == str(tmp_path / name / "pretrain") and fine.prepared is None
        assert fine.data.sources[0].paths == [f"{p.store}/datagen/dedup/exercises"]
        assert p.corpora["pretrain"] == [f"{p.store}/datagen/dedup/filtered_code", f"{p.store}/datagen/dedup/textbooks"]
        assert p.cfg.data.sources[0].type == "datagen"


def test_stage_settings_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError) as err:
        _plan("demo", run_dir=str(tmp_path), skip=["pretrian"])
    assert "skip.0" in str(err.value) and "'pretrain'" in str(err.value)  # the valid choices are listed
    with pytest.raises(ConfigError, match="pretrain needs the data stage"):
        _plan("demo", run_dir=str(tmp_path), skip=["data"])
    with pytest.raises(ConfigError, match="tokenizer is skipped but tokenizer.path names none"):
        _plan("demo", run_dir=str(tmp_path), skip=["tokenizer"])
    with pytest.raises(ConfigError, match="evaluate needs the export stage"):
        _plan("demo", run_dir=str(tmp_path), skip=["export"])
    with pytest.raises(ConfigError, match="storage=foo://bucket: unknown scheme .*s3://"):
        _plan("demo", run_dir=str(tmp_path / "bad"), storage="foo://bucket")
    assert not (tmp_path / "bad").exists()  # nothing written
    with pytest.raises(ConfigError, match="datagen.teacher"):
        _plan("demo", run_dir=str(tmp_path), datagen={"enabled": True, "labels": None, "teacher": {"modle": "x"}})
    # with the sweep on, its trials start from the pipeline's pretraining run on the finetuning data
    p = _plan("demo", run_dir=str(tmp_path), tune={"enabled": True, "config": "configs/tune/tiny.yaml"})
    assert p.sweep is not None and p.sweep.run_dir == str(tmp_path / "tune")
    assert p.sweep.overrides["init_from"] == str(tmp_path / "pretrain")
    assert p.sweep.overrides["data.sources"] == [{"type": "datagen", "paths": p.corpora["finetune"]}]
    assert p.sweep.overrides["model"]["name"] == "tiny" and p.sweep.overrides["optim.max_steps"] == 40


def test_checkpoints_on_object_storage_are_loaded_through_a_local_copy(tmp_path, monkeypatch, tokenizer):
    """A URI checkpoint (here ``file://``, the same pyarrow path as ``s3://`` / ``gs://``) is copied once per content
    into the cache; the serving app accepts one as is."""
    from phi1_ray.checkpoint import load_model, save_checkpoint
    from phi1_ray.serving.app import resolve_checkpoint
    from phi1_ray.storage import localize
    from phi1_ray.tokenizer import load_tokenizer
    from tests.conftest import random_model

    monkeypatch.setenv("PHI1_CACHE", str(tmp_path / "cache"))
    model = random_model()
    save_checkpoint(model, tmp_path / "bucket" / "export")
    uri = (tmp_path / "bucket" / "export").as_uri()
    loaded, _ = load_model(uri)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    first = localize(uri)
    assert first.startswith(str(tmp_path / "cache")) and localize(uri) == first  # cached
    save_checkpoint(random_model(seed=1), tmp_path / "bucket" / "export")  # new content at the same URI: a new copy
    second = localize(uri)
    assert second != first and not torch.equal(load_model(uri)[0].lm_head.weight, loaded.lm_head.weight)
    assert resolve_checkpoint("s3://bucket/phi1/export") == "s3://bucket/phi1/export"
    tokenizer.save_pretrained(tmp_path / "bucket" / "tokenizer")  # a trained tokenizer, as the pipeline uploads it
    remote = load_tokenizer((tmp_path / "bucket" / "tokenizer").as_uri())
    assert remote.encode("def f(x):\n    return x\n") == tokenizer.encode("def f(x):\n    return x\n")
    with pytest.raises(Exception, match="no files there|cannot list"):
        localize((tmp_path / "empty").as_uri())


def test_a_remote_checkpoint_names_its_tokenizer_by_uri(tmp_path, monkeypatch, tokenizer):
    """A run starting from a URI hands its workers the tokenizer's URI (every node loads it), not the driver's
    local copy; a local checkpoint hands the local directory."""
    from phi1_ray.checkpoint import resolve, save_checkpoint
    from tests.conftest import random_model

    monkeypatch.setenv("PHI1_CACHE", str(tmp_path / "cache"))
    save_checkpoint(random_model(), tmp_path / "bucket" / "export", tokenizer)
    uri = (tmp_path / "bucket" / "export").as_uri()
    remote = resolve(uri)
    assert remote.tokenizer.startswith(str(tmp_path / "cache")) and remote.portable_tokenizer == uri
    local = resolve(tmp_path / "bucket" / "export")
    assert local.portable_tokenizer == local.tokenizer == str(tmp_path / "bucket" / "export")


def test_evaluation_settings_keep_finished_records_valid():
    """The evaluate stage hashes the sampling keys its section gained only when they are set: a run directory of an
    unchanged config keeps its finished evaluate stage; a changed top_p reruns it."""
    from phi1_ray.pipeline.stages.evaluate import _evaluation_settings

    cfg = build(PipelineConfig, read_yaml(ROOT / "configs" / "pipeline" / "demo.yaml"))
    assert set(_evaluation_settings(cfg)) == {
        "enabled", "benchmark", "limit", "n", "temperature", "max_new_tokens", "timeout_s", "actors", "use_gpu"
    }  # fmt: skip
    cfg.evaluation.top_p = 0.5
    assert _evaluation_settings(cfg)["top_p"] == 0.5
