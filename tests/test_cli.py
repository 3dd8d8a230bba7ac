"""The `kvfleet` command as a user runs it (the README's main job)."""

import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvfleet.cli", *args], capture_output=True, text=True, timeout=300)


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
