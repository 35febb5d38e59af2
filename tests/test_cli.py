"""The one command line of every job (``phi1_ray/cli.py``): ``--help`` lists the config's keys with their docs, a
job's own flags and the dotted overrides they stand for give the same config, and a bad value or flag is one
``error:`` message with exit status 2."""

from __future__ import annotations

import runpy

import pytest

from phi1_ray.cli import config_from_argv
from phi1_ray.data.config import PrepareDataConfig
from phi1_ray.datagen.config import DecontamJobConfig, DedupJobConfig
from phi1_ray.errors import ConfigError
from phi1_ray.evals.run import EvalJobConfig
from phi1_ray.generate import GenerateJobConfig
from phi1_ray.hf import ExportJobConfig
from phi1_ray.pipeline.config import PipelineConfig
from tests.conftest import ROOT, assert_user_error, run_job


def declared_flags(job: str) -> dict:
    """The flag table a job declares (its module run without ``__main__``)."""
    return runpy.run_path(str(ROOT / "jobs" / f"{job}.py"))["FLAGS"]


EQUIVALENT = [
    (
        "evaluate",
        EvalJobConfig,
        ["--samples", "s.jsonl", "--model", "m", "--benchmark", "mbpp", "--benchmark-file", "m.jsonl", "--n", "4",
         "--temperature", "0.8", "--top-p", "0.9", "--max-new-tokens", "64", "--seed", "3", "--batch-size", "2",
         "--limit", "5", "--actors", "2", "--gpu", "--workers", "3", "--timeout", "5", "--memory-mb", "512",
         "--mlflow-run-id", "abc", "--tracking-uri", "file:/tmp/m", "--out", "o", "--stop", r"\nclass", r"\ndef"],
        ["samples=s.jsonl", "model=m", "benchmark=mbpp", "benchmark_file=m.jsonl", "sampling.n=4",
         "sampling.temperature=0.8", "sampling.top_p=0.9", "sampling.max_new_tokens=64", "sampling.seed=3",
         "sampling.batch_size=2", "limit=5", "actors=2", "use_gpu=true", "workers=3", "limits.timeout_s=5",
         "limits.memory_mb=512", "mlflow_run_id=abc", "tracking_uri=file:/tmp/m", "out=o",
         r'sampling.stop=["\nclass", "\ndef"]'],
    ),
    (
        "generate",
        GenerateJobConfig,
        ["--checkpoint", "ck", "--prompt", "def add(a, b):", "--max-new-tokens", "12", "--temperature", "0.5",
         "--top-p", "0.9", "--top-k", "40", "--seed", "7", "--stop", "\n\n", "--stop", "\nclass", "--json"],
        ["checkpoint=ck", "prompt='def add(a, b):'", "sampling.max_new_tokens=12", "sampling.temperature=0.5",
         "sampling.top_p=0.9", "sampling.top_k=40", "sampling.seed=7", 'sampling.stop=["\\n\\n", "\\nclass"]',
         "json_output=true"],
    ),
    (
        "prepare_data",
        PrepareDataConfig,
        ["--input", "a.jsonl", "--input", "tree", "--tokenizer", "tok", "--seq-len", "31", "--val-fraction", "0.1",
         "--shuffle", "--strict", "--out", "o", "--run-dir", "r"],
        ["data.sources=[{type: jsonl, paths: [a.jsonl]}, {type: files, paths: [tree], extensions: [.py, .txt, .md]}]",
         "data.tokenizer=tok", "data.seq_len=31", "data.val_fraction=0.1", "data.shuffle=true", "data.strict=true",
         "out=o", "run_dir=r"],
    ),
    (
        "dedup",
        DedupJobConfig,
        ["--input", "a", "--input", "b", "--out", "o", "--threshold", "0.7", "--num-perm", "64", "--shingle", "3"],
        ["inputs=[a, b]", "out=o", "dedup.threshold=0.7", "dedup.num_perm=64", "dedup.shingle=3"],
    ),
    (
        "decontaminate",
        DecontamJobConfig,
        ["--input", "x.jsonl", "--out", "o", "--benchmark", "humaneval", "--benchmark", "mbpp=m.jsonl", "--ngram",
         "10", "--tau", "0.8", "--encoder", "enc", "--embedding-similarity", "0.9", "--actors", "2"],
        ["input=x.jsonl", "out=o", "benchmarks=[humaneval, mbpp=m.jsonl]", "decontam.ngram=10", "decontam.tau=0.8",
         "decontam.encoder.path=enc", "decontam.embedding_similarity=0.9", "actors=2"],
    ),
]  # fmt: skip


@pytest.mark.parametrize("job, cls, flags, overrides", EQUIVALENT, ids=[e[0] for e in EQUIVALENT])
def test_legacy_flags_and_dotted_overrides_give_the_same_config(job, cls, flags, overrides, capsys):
    table = declared_flags(job)
    assert {f for f in flags if f.startswith("--")} - {"--out", "--run-dir"} <= set(table)
    from_flags = config_from_argv(cls, None, argv=flags, flags=table)
    from_keys = config_from_argv(cls, None, argv=overrides, flags=table)
    assert from_flags == from_keys
    assert "# resolved config" in capsys.readouterr().out


def test_flags_fill_typed_keys_and_unset_flags_leave_the_file_alone(tmp_path, capsys):
    cfg = config_from_argv(EvalJobConfig, None, ["--samples", "s.jsonl", "--stop"], flags=declared_flags("evaluate"))
    assert cfg.sampling.stop == [] and cfg.sampling.top_p == 0.95 and cfg.limits.timeout_s == 3.0
    cfg = config_from_argv(
        EvalJobConfig, None, ["--samples", "s", "--stop", r"\nclass"], flags=declared_flags("evaluate")
    )
    assert cfg.sampling.stop == ["\nclass"]  # typed in a shell as '\nclass': a newline
    config = tmp_path / "eval.yaml"
    config.write_text("samples: s.jsonl\nsampling: {temperature: 0.4, n: 3}\nlimits: {timeout_s: 9}\n")
    cfg = config_from_argv(EvalJobConfig, None, ["--config", str(config), "--n", "5"], flags=declared_flags("evaluate"))
    assert (cfg.sampling.temperature, cfg.sampling.n, cfg.limits.timeout_s) == (0.4, 5, 9.0)
    # precedence: file < dotted overrides < flags
    cfg = config_from_argv(EvalJobConfig, None, ["--config", str(config), "sampling.n=7", "--n", "8"],
                           flags=declared_flags("evaluate"))  # fmt: skip
    assert cfg.sampling.n == 8


def test_help_lists_every_key_with_its_doc_and_flag():
    result = run_job("jobs/evaluate.py", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for fragment in (
        "--temperature TEMPERATURE 0 means greedy. [sampling.temperature]",
        "sampling.temperature float = 0.0 (--temperature) 0 means greedy.",
        "limits.timeout_s float = 3.0 (--timeout) Wall-clock seconds per sample",
        "limits.nproc int = 32 Processes of the samples' user (RLIMIT_NPROC)",
        "sampling.top_k int = 0 0 disables top-k.",
        "ray.address str | null = null",
    ):
        assert fragment in text, fragment
    result = run_job("jobs/pretrain.py", "--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0 and "--run-dir DIR" in text, result.stderr
    assert "optim.grad_clip float = 1.0 Gradient-norm clipping; 0 disables it." in text
    assert "model.doc_mask bool = false Packed rows: positions restart after each EOS" in text


def test_bad_values_and_flags_are_one_error_line_with_status_2(tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_text("")
    result = run_job("jobs/evaluate.py", "--samples", str(samples), "--top-p", "abc")
    assert_user_error(result, "sampling.top_p (--top-p): Input should be a valid number", "'abc'")
    result = run_job("jobs/evaluate.py", "--samples", str(samples), "sampling.top_p=2")
    assert_user_error(result, "sampling (--top-p): top_p must be in (0, 1], got 2.0")
    result = run_job("jobs/evaluate.py", "--samples", str(samples), "--checkpoint", "ck")
    assert_user_error(result, "give exactly one of checkpoint, samples or endpoint")
    result = run_job("jobs/evaluate.py", "--samples", str(samples), "sampling.temprature=1")
    assert_user_error(result, "sampling.temprature: unknown key (did you mean 'temperature'?)")
    result = run_job("jobs/evaluate.py", "--samples", str(samples), "--top-q", "0.5")
    assert_user_error(result, "unrecognized arguments: --top-q")
    result = run_job("jobs/export.py", "--out", str(tmp_path / "o"))
    assert_user_error(result, "checkpoint (--checkpoint): Field required")
    result = run_job("jobs/dedup.py", "--input", "a", "--out", str(tmp_path / "o"), "--threshold", "2")
    assert_user_error(result, "dedup (--threshold): threshold must be in (0, 1]")
    assert not (tmp_path / "o").exists()


def test_flags_name_keys_of_their_config():
    with pytest.raises(TypeError, match="not a key of ExportJobConfig"):
        config_from_argv(ExportJobConfig, None, [], flags={"--ckpt": "ckpt"})
    with pytest.raises(ConfigError, match="model.n_layers: unknown key"):
        config_from_argv(PipelineConfig, None, ["model.n_layers=3"])


def test_stop_flags_read_escapes_as_typed_in_a_shell():
    """``--stop '\\ndef'`` (the README's example) is a newline then ``def`` for generate as for evaluate; other text,
    accents and symbols included, stays as typed."""
    gen = config_from_argv(
        GenerateJobConfig, None, ["--checkpoint", "c", "--prompt", "p", "--stop", r"\ndef", "--stop", "é→"],
        flags=declared_flags("generate"),
    )  # fmt: skip
    assert gen.sampling.stop == ["\ndef", "é→"]
    ev = config_from_argv(
        EvalJobConfig, None, ["--samples", "s", "--stop", r"\nclass"], flags=declared_flags("evaluate")
    )
    assert ev.sampling.stop == ["\nclass"]
