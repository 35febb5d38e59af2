import pytest

from phi1_ray.config import apply_overrides, build, load_config, parse_override, to_yaml
from phi1_ray.errors import ConfigError
from phi1_ray.model import MODEL_PRESETS, ModelConfig
from phi1_ray.pipeline.config import PipelineConfig
from tests.conftest import ROOT, assert_user_error, run_job


def test_presets_have_the_paper_sizes():
    phi1 = ModelConfig.from_name("phi-1")
    assert (phi1.n_layer, phi1.n_embd, phi1.n_inner, phi1.n_head) == (24, 2048, 8192, 32)
    small = ModelConfig.from_name("phi-1-small")
    assert (small.n_layer, small.n_embd, small.n_inner, small.n_head) == (20, 1024, 4096, 16)
    for cfg in (phi1, small, ModelConfig.from_name("tiny")):
        assert cfg.head_dim == 64 and cfg.rotary_dim == 32
    assert phi1.vocab_size == small.vocab_size == 51200
    assert set(MODEL_PRESETS) == {"phi-1", "phi-1-small", "tiny"}


def test_preset_fields_can_be_overridden():
    cfg = ModelConfig.from_name("phi-1", n_layer=4, attn_impl="eager")
    assert cfg.n_layer == 4 and cfg.n_embd == 2048 and cfg.attn_impl == "eager"


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ConfigError) as exc:
        ModelConfig.from_name("phi-2")
    assert "phi-2" in str(exc.value) and "phi-1, phi-1-small, tiny" in str(exc.value)


def test_unknown_key_names_the_key_and_the_valid_keys():
    with pytest.raises(ConfigError) as exc:
        load_config(PipelineConfig, overrides=["model.n_layers=4"])
    msg = str(exc.value)
    assert "model.n_layers: unknown key" in msg and "did you mean 'n_layer'" in msg and "n_embd" in msg


def test_bad_choice_lists_the_choices():
    with pytest.raises(ConfigError) as exc:
        load_config(PipelineConfig, overrides=["model.attn_impl=fast"])
    msg = str(exc.value)
    assert "model.attn_impl" in msg and "'sdpa'" in msg and "'eager'" in msg and "'fast'" in msg


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="model: n_embd \\(100\\) must be divisible by n_head"):
        load_config(PipelineConfig, overrides=["model.n_embd=100"])
    with pytest.raises(ConfigError, match="model.n_layer"):
        load_config(PipelineConfig, overrides=["model.n_layer=many"])
    with pytest.raises(ConfigError, match="top_p must be in"):
        load_config(PipelineConfig, overrides=["sampling.top_p=0"])


def test_overrides_are_typed_and_nested():
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], 3e-4)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=runs/x") == (["a"], "runs/x")
    data = apply_overrides({"model": {"name": "tiny"}}, ["model.n_layer=4", "seed=3"])
    assert data == {"model": {"name": "tiny", "n_layer": 4}, "seed": 3}
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("model.n_layer")


def test_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: phi-1-small\nseed: 7\n")
    cfg = load_config(PipelineConfig, path, ["model.n_layer=2"])
    assert cfg.seed == 7 and cfg.model.n_layer == 2 and cfg.model.n_embd == 1024
    assert "n_layer: 2" in to_yaml(cfg)


def test_broken_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\nmodel:\n  name: [tiny\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(PipelineConfig, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PipelineConfig, tmp_path / "missing.yaml")


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs" / "pipeline").glob("*.yaml")):
        load_config(PipelineConfig, path)


def test_job_prints_config_errors_without_traceback(tmp_path):
    result = run_job(
        "jobs/pipeline.py", "--config", "configs/pipeline/demo.yaml", "model.name=phi-2", "--run-dir", str(tmp_path)
    )
    assert_user_error(result, "unknown model preset 'phi-2'", "phi-1-small")
    assert not any(tmp_path.iterdir()), "nothing is written before the config is valid"


def test_one_sampling_section_for_generation_evaluation_and_the_teacher():
    from phi1_ray.config import DEFAULT_STOP, SamplingConfig
    from phi1_ray.datagen.config import TeacherConfig
    from phi1_ray.evals.generation import EvalSampling
    from phi1_ray.pipeline.config import EvalStageConfig

    keys = set(SamplingConfig.model_fields)
    assert keys == {"max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop"}
    for cls in (EvalSampling, EvalStageConfig, TeacherConfig):
        assert issubclass(cls, SamplingConfig) and keys <= set(cls.model_fields)
        with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\]"):  # SamplingConfig's own check
            build(cls, {"top_p": 1.5})
    # each keeps its defaults
    assert EvalSampling().max_new_tokens == 384 and EvalSampling().stop == list(DEFAULT_STOP)
    assert EvalSampling(seed=5).for_sample(2) == SamplingConfig(
        **{**EvalSampling().model_dump(include=keys), "seed": 7}
    )
    assert EvalStageConfig().top_p == 0.95 and EvalStageConfig().stop == list(DEFAULT_STOP)
    teacher = TeacherConfig()
    assert (teacher.max_new_tokens, teacher.temperature, teacher.top_p) == (1024, 1.0, 1.0)


def test_renamed_keys_keep_their_old_spelling():
    from phi1_ray.datagen.config import GenerateConfig, TeacherConfig

    old = load_config(GenerateConfig, overrides=["teacher.max_tokens=64", "teacher.temperature=0.5"])
    new = load_config(GenerateConfig, overrides=["teacher.max_new_tokens=64", "teacher.temperature=0.5"])
    assert old == new and old.teacher.max_new_tokens == 64 and TeacherConfig(max_tokens=8).max_new_tokens == 8
    with pytest.raises(ConfigError, match="max_tokens is the old name of max_new_tokens: give one of them"):
        load_config(GenerateConfig, overrides=["teacher.max_tokens=64", "teacher.max_new_tokens=32"])
    with pytest.raises(ConfigError, match=r"teacher.max_token: unknown key \(did you mean 'max_tokens'\?\)"):
        load_config(GenerateConfig, overrides=["teacher.max_token=64"])
    with pytest.raises(ConfigError, match="top_k must be 0: the OpenAI API has no top_k"):
        load_config(GenerateConfig, overrides=["teacher.top_k=5"])
