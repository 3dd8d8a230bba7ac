"""The `kvflock` command as a user runs it (the README's main job)."""

import importlib.metadata
import subprocess
import sys

import pytest


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
    assert "No local cluster runs" in result.stdout, result.stderr
    result = run_cli("status", "--log-level", "loud")
    assert result.returncode == 2 and "--log-level" in result.stderr and "Traceback" not in result.stderr
