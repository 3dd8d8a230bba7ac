"""The `kvflock` command as a user runs it (the README's main job)."""

import argparse
import importlib.metadata
import json
import subprocess
import sys

import pytest

from kvflock.cli import build_parser, engine_config
from kvflock.worker.config import EngineConfig


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvflock.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_generate_answers_a_chat_prompt_with_the_demo_model():
    result = run_cli("generate", "--prompt", "What is the capital of France?", "--max-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_bad_argument_is_a_clear_error_without_traceback():
    result = run_cli("generate", "--prompt", "hi", "--max-tokens", "0")
    assert result.returncode == 2
    assert "max_tokens" in result.stderr and "Traceback" not in result.stderr


def test_unknown_model_is_a_clear_error(tmp_path):
    result = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_version_is_the_distributions():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kvflock {importlib.metadata.version('kvflock')}"


def test_log_level_is_accepted_after_the_subcommand(tmp_path):
    result = run_cli("status", "--state-dir", str(tmp_path), "--log-level", "warning")
    assert "no local cluster runs" in result.stdout, result.stderr
    result = run_cli("status", "--log-level", "loud")
    assert result.returncode == 2 and "--log-level" in result.stderr and "Traceback" not in result.stderr



def parse_engine(*args: str) -> EngineConfig:
    return engine_config(build_parser().parse_args(["serve", *args]))


def subcommand(name: str) -> argparse.ArgumentParser:
    [subparsers] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices[name]


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_every_engine_setting_is_a_flag_with_the_fields_help(command):
    actions = {a.dest: a for a in subcommand(command)._actions}
    for name, field in EngineConfig.model_fields.items():
        if command == "generate" and name == "seed":  # generate's --seed is the sampling seed
            continue
        assert f"--{name.replace('_', '-')}" in actions[name].option_strings
        assert actions[name].help.startswith(field.description)


def test_flags_not_given_take_the_models_defaults():
    assert parse_engine() == EngineConfig()
    assert parse_engine().max_num_seqs == EngineConfig.model_fields["max_num_seqs"].default


def test_flags_keep_their_old_names_and_types():
    config = parse_engine("--no-prefix-caching", "--no-async-scheduling", "--enforce-eager", "--block-size", "32",
                          "--kv-cache-dtype", "fp8", "--gpu-memory-utilization", "0.5", "--max-model-len", "512")
    assert (config.enable_prefix_caching, config.async_scheduling, config.enforce_eager) == (False, False, True)
    assert (config.block_size, config.kv_cache_dtype, config.gpu_memory_utilization) == (32, "fp8", 0.5)
    assert config.max_model_len == 512
    assert parse_engine("--async-scheduling").async_scheduling is True


def test_config_file_is_read_and_explicit_flags_override_it(tmp_path):
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"model": "/models/llama", "max_num_seqs": 8, "block_size": 32,
                                "enable_prefix_caching": False}))
    config = parse_engine("--config", str(path), "--max-num-seqs", "16", "--prefix-caching")
    assert (config.model, config.block_size) == ("/models/llama", 32)
    assert (config.max_num_seqs, config.enable_prefix_caching) == (16, True)


@pytest.mark.parametrize("content,message", [
    ({"max_num_seqs": 0}, "engine.json: max_num_seqs: Input should be greater than or equal to 1 (got 0)"),
    ({"max_num_seq": 8}, "engine.json: max_num_seq: unknown field"),
    ({"block_size": 12}, "engine.json: block_size: "),
    ([8], "engine.json: must be a JSON object"),
])
def test_bad_config_file_is_a_one_line_error_naming_the_field(tmp_path, content, message):
    path = tmp_path / "engine.json"
    path.write_text(json.dumps(content))
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("args,message", [
    (["--max-num-seqs", "0"], "max_num_seqs: Input should be greater than or equal to 1 (got 0)"),
    (["--max-num-seqs", "many"], "--max-num-seqs: invalid int value"),
    (["--kv-cache-dtype", "fp4"], "--kv-cache-dtype: invalid choice"),
    (["--speculative-method", "draft"], "draft_model: required"),
])
def test_bad_flag_is_a_one_line_error_naming_the_field(args, message):
    result = run_cli("serve", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_missing_config_file_is_a_clear_error(tmp_path):
    result = run_cli("serve", "--config", str(tmp_path / "engine.json"))
    assert result.returncode == 2
    assert "engine.json: cannot read" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("content", "message"), [
    (None, "lora_modules_file: cannot read"),
    ("[1, 2]", "must hold a JSON object of adapter name -> folder"),
])
def test_a_bad_lora_modules_file_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "adapters.json"
    if content is not None:
        path.write_text(content)
    result = run_cli("serve", "--enable-lora", "--lora-modules-file", str(path))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_the_command_line_is_built_without_torch():
    # The operator image has no torch, and its `kvflock operator` builds every subcommand's flags.
    check = "import sys; from kvflock.cli import build_parser; build_parser(); assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-P", "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_port_out_of_range_is_a_one_line_error():
    result = run_cli("serve", "--port", "99999")
    assert result.returncode == 2 and "--port: must be between 1 and 65535, got 99999" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_kubeconfig_is_a_one_line_error(tmp_path):
    result = run_cli("operator", "--kubeconfig", str(tmp_path / "nope"))
    assert result.returncode == 2 and "kubeconfig: cannot load" in result.stderr and "Traceback" not in result.stderr


def test_up_refuses_a_malformed_manifest_before_starting_anything(tmp_path):
    manifest = tmp_path / "bad.yaml"
    manifest.write_text("apiVersion: [\n")
    result = run_cli("up", "--state-dir", str(tmp_path / "state"), "--apply", str(manifest))
    assert result.returncode == 2 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()
