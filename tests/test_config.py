import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptbake.config import FIELDS, Config, ConfigError, apply_env_defaults, from_dict, parse_args, to_dict
from promptbake.errors import UserError


def test_defaults_file_cli_precedence(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("learning_rate: 0.01\nnum_epochs: 7\ntemperatures: [0.5, 0.9]\n")
    cfg, _ = parse_args(["--config", str(f), "--learning_rate", "5e-5"])
    assert cfg.learning_rate == 5e-5  # CLI beats file
    assert cfg.num_epochs == 7  # file beats default
    assert cfg.temperatures == [0.5, 0.9]
    assert cfg.lora_r == Config().lora_r  # default


def test_cli_lists_and_bools():
    cfg, _ = parse_args(["--temperatures", "0.5,0.7,1", "--overwrite", "--resume", "false", "--markers", "arr,matey"])
    assert cfg.temperatures == [0.5, 0.7, 1.0]
    assert cfg.overwrite is True and cfg.resume is False
    assert cfg.markers == ["arr", "matey"]


def test_unknown_cli_flag_names_close_match():
    with pytest.raises(ConfigError, match=r"unknown setting `learnin_rate`.*learning_rate"):
        parse_args(["--learnin_rate", "1"])


def test_unknown_yaml_key_names_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("lora_rank: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown setting `lora_rank`.*lora_r"):
        parse_args(["--config", str(f)])


def test_wrong_type_names_field(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("num_epochs: three\n")
    with pytest.raises(ConfigError, match=r"`num_epochs` must be int, got 'three'"):
        parse_args(["--config", str(f)])
    with pytest.raises(ConfigError, match=r"`batch_size` must be int"):
        parse_args(["--batch_size", "2.5"])


def test_bad_choice_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"`backend` is 'cloud'; choose one of \['auto', 'api', 'local'\]"):
        parse_args(["--backend", "cloud"])


def test_yaml_is_loaded_safely(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_args(["--config", str(f)])


def test_targets_keys_checked(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("targets:\n  - {prompt_file: a.md, data: a.jsonl, wieght: 2}\n")
    with pytest.raises(ConfigError, match="unknown key.*wieght"):
        parse_args(["--config", str(f)])


def test_saved_config_drops_credentials_in_urls():
    cfg, _ = parse_args(["--api_base_url", "https://user:sk-secret@example.com:8443/v1?key=sk-secret2"])
    saved = repr(to_dict(cfg))
    assert "sk-secret" not in saved and "https://example.com:8443/v1" in saved


# ---------------------------------------------------------------- environment defaults (API_BASE_URL, API_MODEL)
def test_env_file_fills_the_api_settings_and_says_where_from(tmp_path, monkeypatch, capsys):
    """The README's path: .env in the working folder, no flag. Before the fix the URL was ignored."""
    from promptbake.generate import pick_backend

    monkeypatch.setenv("API_BASE_URL", "")  # empty counts as unset; monkeypatch restores what .env sets
    monkeypatch.setenv("API_MODEL", "")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("API_BASE_URL=http://user:pw@127.0.0.1:9/v1\nAPI_MODEL=served\n")
    cfg, _ = parse_args([])
    assert cfg.api_base_url == "http://user:pw@127.0.0.1:9/v1" and cfg.api_model == "served"
    assert pick_backend(cfg) == "api"
    out = capsys.readouterr().out
    assert "api_base_url: http://127.0.0.1:9/v1 <- $API_BASE_URL (from .env)" in out and "pw" not in out


def test_flag_beats_environment(monkeypatch):
    monkeypatch.setenv("API_BASE_URL", "http://127.0.0.1:1/v1")
    cfg, _ = parse_args(["--api_base_url", "http://127.0.0.1:2/v1"])
    assert cfg.api_base_url == "http://127.0.0.1:2/v1"
    cfg = Config()
    assert apply_env_defaults(cfg, {"API_BASE_URL": "http://x/v1"}) == {"api_base_url": "$API_BASE_URL"}
    assert cfg.api_base_url == "http://x/v1"


# ---------------------------------------------------------------- inline prompts keep their commas
def test_training_prompts_keep_commas_and_repeat():
    cfg, _ = parse_args(["--training_prompts", "Hello, who are you?", "--training_prompts", "Tell me a joke, please."])
    assert cfg.training_prompts == ["Hello, who are you?", "Tell me a joke, please."]
    assert from_dict({"training_prompts": "One, two"}, "x.yaml").training_prompts == ["One, two"]


# ---------------------------------------------------------------- names and ranges
@pytest.mark.parametrize("name", ["../../somewhere", "", ".", "..", "a/b", "-x", "x" * 65, "a b", "näme"])
def test_bad_names_are_refused(name):
    with pytest.raises(ConfigError, match="`name` is .*use 1-64 letters"):
        parse_args([f"--name={name}"])


@pytest.mark.parametrize("flag,value", [
    ("num_epochs", "0"), ("top_k", "0"), ("concurrency", "0"), ("batch_size", "0"), ("grad_accum", "0"),
    ("lora_r", "0"), ("save_steps", "0"), ("teacher_batch_size", "0"), ("learning_rate", "-1"),
    ("max_retries", "-1"), ("eval_fraction", "-1"), ("num_queries", "-5"), ("samples_per_query", "0"),
    ("learning_rate", "nan"), ("max_grad_norm", "inf"), ("temperatures", "0.7,-1"), ("top_p", "0"),
])
def test_out_of_range_values_are_refused_in_one_line(flag, value):
    with pytest.raises(ConfigError) as e:
        parse_args([f"--{flag}", value])
    assert f"`{flag}` is" in str(e.value) and "must be in" in str(e.value) and "\n" not in str(e.value)


def test_every_numeric_setting_has_a_range_that_holds_its_default():
    for f in dataclasses.fields(Config):
        if f.type in ("int", "float", int, float):
            assert "range" in f.metadata, f.name
            assert getattr(Config(), f.name) in f.metadata["range"], f.name


@pytest.mark.parametrize("target,match", [
    ({"weight": "abc"}, r"`targets\[0\].weight` must be float"), ({"data": [1, 2]}, r"`targets\[0\].data` must be str"),
    ({"weight": -1}, r"`targets\[0\].weight` is -1.0; it must be in \(0, 1e\+06\]"),
    ({"name": "../x"}, r"targets\[0\].name` is"),
])
def test_target_fields_are_checked(target, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"targets": [{"prompt_file": "p.md", **target}]}, "t.yaml")


def test_yaml_syntax_error_names_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("num_epochs: 3\nlearning_rate: [1e-3\nbatch_size: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        parse_args(["--config", str(f)])


ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=20), st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=5)), max_size=3),
                      st.dictionaries(st.sampled_from(["weight", "data", "name", "bogus"]),
                                      st.one_of(st.integers(), st.text(max_size=5)), max_size=3))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(FIELDS)), value=ANY_VALUE)
def test_any_value_gives_a_valid_config_or_one_line_error(name, value):
    """Random values at every setting: a config that passes every range, or one ConfigError line; never a traceback."""
    try:
        cfg = from_dict({name: value}, "fuzz.yaml")
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.yaml: ")
        return
    got = getattr(cfg, name)
    rng = FIELDS[name].metadata.get("range")
    for v in (got if isinstance(got, list) else [got]):
        if rng is not None:
            assert isinstance(v, (int, float)) and math.isfinite(v) and v in rng


def test_model_with_custom_code_is_refused_without_the_flag(tmp_path, tiny_model_dir):
    """A model folder whose config asks to run its own Python code only loads with --trust_remote_code."""
    import json
    import shutil

    from promptbake.model import load_model

    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "modeling_custom.py").write_text("raise SystemExit('custom code ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config.update({"model_type": "custom-xyz", "auto_map": {"AutoModelForCausalLM": "modeling_custom.Custom",
                                                           "AutoConfig": "modeling_custom.CustomConfig"}})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="--trust_remote_code"):
        load_model(str(folder), "cpu", trust_remote_code=False)
