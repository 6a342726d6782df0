import pytest

from config import Config, ConfigError, parse_args


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


def test_trust_remote_code_off_by_default():
    assert Config().trust_remote_code is False


def test_saved_config_drops_credentials_in_urls():
    from config import to_dict

    cfg, _ = parse_args(["--api_base_url", "https://user:sk-secret@example.com:8443/v1?key=sk-secret2"])
    saved = repr(to_dict(cfg))
    assert "sk-secret" not in saved and "https://example.com:8443/v1" in saved
