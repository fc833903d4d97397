"""The command line's settings files: a missing file, a YAML syntax error or a misspelt key is one line
that names the file (and the line) with the fix, before any model loads or any server is asked."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from doctune.cli import app
from doctune.model_settings import TrainSettings, load_settings_file


def one_line_error(args: list[str]) -> str:
    """The error typer prints for a bad parameter, with its box and line wrapping taken out."""
    result = CliRunner().invoke(app, args, env={"COLUMNS": "1000", "TERMINAL_WIDTH": "1000"})
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())


def test_a_missing_settings_file_is_named(tmp_path):
    out = one_line_error(["train", str(tmp_path), "--config", str(tmp_path / "nope.yaml")])
    assert "nope.yaml: no such settings file" in out and "check the path" in out


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "build.yaml"
    bad.write_text("llm:\n  base_url: http://127.0.0.1:8765/v1\n  model: [unclosed\n")
    out = one_line_error(["build-dataset", str(tmp_path), "--settings", str(bad)])
    assert "build.yaml, line 4" in out and "not valid YAML" in out and "key: value" in out


def test_nightly_checks_its_files_before_asking_the_server(tmp_path, monkeypatch):
    # No Prefect server answers here: the error must come from the file, at once.
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    bad = tmp_path / "night.yaml"
    bad.write_text("- a list\n- not settings\n")
    assert "night.yaml: expected `key: value` lines" in one_line_error(["nightly", "--settings", str(bad)])
    typo = tmp_path / "train.yaml"
    typo.write_text("lora_rank: 8\n")
    assert "unknown key 'lora_rank'; did you mean 'lora_r'?" in one_line_error(
        ["nightly", "--train-config", str(typo)])


def test_an_empty_file_is_the_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert load_settings_file(empty, TrainSettings) == TrainSettings()
    with pytest.raises(ValueError, match="a folder, not a settings file"):
        load_settings_file(Path(tmp_path), TrainSettings)


KEY = "sk-proj-" + "Zq7" * 12  # a made-up key


def test_a_key_pasted_into_api_key_env_is_refused_without_repeating_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # refused before any server is asked
    build = tmp_path / "build.yaml"
    build.write_text(f"llm:\n  api_key_env: {KEY}\n")
    out = one_line_error(["build-dataset", str(tmp_path), "--settings", str(build)])
    assert "llm.api_key_env must name the environment variable" in out and "revoke" in out and KEY not in out
    night = tmp_path / "night.yaml"
    night.write_text(f"eval:\n  judge_llm:\n    api_key_env: {KEY}\n")
    out = one_line_error(["nightly", "--settings", str(night)])
    assert "eval.judge_llm.api_key_env" in out and "looks like an API key" in out and KEY not in out


def test_key_names_pass_and_keys_fail_wherever_an_endpoint_is():
    from doctune.key_names import check_key_names
    from doctune.nightly import NightlySettings
    from doctune.settings import BuildSettings, LLMSettings

    check_key_names(NightlySettings())  # the defaults name DOCTUNE_LLM_API_KEY
    check_key_names(BuildSettings(llm=LLMSettings(api_key_env="OPENAI_API_KEY")))
    for bad in (KEY, "my key", "sk_live_" + "a" * 20, "1ABC"):
        with pytest.raises(ValueError, match="build.llm.api_key_env") as err:
            check_key_names(NightlySettings(build=BuildSettings(llm=LLMSettings(api_key_env=bad))))
        assert bad not in str(err.value)


def test_a_key_written_as_api_key_points_to_where_keys_belong(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    night = tmp_path / "night.yaml"
    night.write_text(f"build:\n  llm:\n    api_key: {KEY}\n")
    out = one_line_error(["nightly", "--settings", str(night)])
    assert "night.yaml: build.llm.api_key is refused" in out and KEY not in out
    assert "build.llm.api_key_env" in out and "build.llm.api_key_secret_block" in out and "Revoke" in out
    build = tmp_path / "build.yaml"
    build.write_text(f"llm:\n  api_key: {KEY}\n")
    out = one_line_error(["build-dataset", str(tmp_path), "--settings", str(build)])
    assert "llm.api_key is refused" in out and "llm.api_key_env" in out and KEY not in out


def test_a_misspelt_nested_key_names_its_path_and_the_closest_key(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    night = tmp_path / "night.yaml"
    night.write_text("build:\n  llm:\n    base_ur: http://127.0.0.1:8765/v1\n")
    out = one_line_error(["nightly", "--settings", str(night)])
    assert "night.yaml: unknown key 'build.llm.base_ur'; did you mean 'base_url'?" in out


def test_the_run_form_schema_refuses_a_key_in_api_key_env():
    # What the Prefect UI's run form (and the server, for a deployment run) validates parameters against.
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError, validate

    from flows.nightly import nightly

    schema = parameter_schema(nightly).model_dump_for_openapi()

    def check(value: str) -> None:
        validate({"settings": {"build": {"llm": {"api_key_env": value}}}}, schema, raise_on_error=True,
                 preprocess=True, ignore_required=True)

    check("OPENAI_API_KEY")
    for bad in (KEY, "my key"):
        with pytest.raises(ValidationError, match="settings.build.llm.api_key_env"):
            check(bad)
