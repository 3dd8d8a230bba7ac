"""`kvflock fetch-model` against a local fake Hub serving a tiny model: the files arrive verified
and load; a cut connection resumes with a Range request; a corrupted file is refused and
deleted; a token and HF_ENDPOINT are honoured; a second fetch reads nothing again."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvflock.shared.hub import HubSource
from kvflock.worker.model.hub import COMPLETE_MARKER, HubClient, Progress, fetch, model_dir
from kvflock.worker.model.source import read_model_config, resolve_model
from tests.fake_hub import FakeHub

REPO = "tiny-org/tiny-llama"
SOURCE = HubSource(REPO, "main")


@pytest.fixture
def hub(tiny_models: dict[str, Path]) -> FakeHub:
    with FakeHub({REPO: {"main": tiny_models["llama"]}}) as fake:
        yield fake


def run_fetch(hub: FakeHub, cache: Path, token: str | None = None) -> tuple[Path, str]:
    out = io.StringIO()
    client = HubClient(hub.url, token)
    try:
        folder = fetch(SOURCE, cache, client, Progress(out), sleep=lambda _: None)
    finally:
        client.close()
    return folder, out.getvalue()


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in b.iterdir())
    return names == sorted(p.name for p in a.iterdir() if not p.name.startswith(".")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_source_parsing_names_the_field() -> None:
    assert HubSource.parse("hf://HuggingFaceTB/SmolLM2-135M-Instruct@v1.0") == HubSource(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "v1.0")
    assert HubSource.parse("hf://org/name").revision == "main"
    with pytest.raises(ValueError, match=r"model source: 'hf://no-name' is not hf://org/name\[@revision\]"):
        HubSource.parse("hf://no-name")


def test_a_fetched_model_is_verified_and_loads(hub: FakeHub, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    folder, log = run_fetch(hub, tmp_path)
    assert folder == model_dir(tmp_path, SOURCE) == tmp_path / "tiny-org--tiny-llama" / "main"
    assert same_files(folder, tiny_models["llama"])
    assert "model.safetensors: downloaded and verified" in log and "\r" not in log  # no terminal: whole lines
    assert read_model_config(resolve_model(str(folder))).num_layers > 0

    again, log = run_fetch(hub, tmp_path)
    assert again == folder and log == f"{REPO}@main: already in {folder}\n" and hub.ranges == []


def test_a_cut_connection_resumes_where_it_stopped(hub: FakeHub, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    hub.cut_once["model.safetensors"] = 1000
    folder, log = run_fetch(hub, tmp_path)
    assert hub.ranges == ["bytes=1000-"]
    assert "model.safetensors: resumed and verified" in log
    assert same_files(folder, tiny_models["llama"])


def test_a_partial_file_left_by_a_killed_fetch_is_resumed(hub: FakeHub, tmp_path: Path,
                                                          tiny_models: dict[str, Path]) -> None:
    weights = (tiny_models["llama"] / "model.safetensors").read_bytes()
    partial = model_dir(tmp_path, SOURCE) / "model.safetensors.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(weights[:4096])
    folder, _ = run_fetch(hub, tmp_path)
    assert hub.ranges == ["bytes=4096-"] and not partial.exists()
    assert (folder / "model.safetensors").read_bytes() == weights


def test_a_corrupted_file_is_refused_and_deleted(hub: FakeHub, tmp_path: Path) -> None:
    hub.corrupt.add("model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: checksum mismatch: the Hub lists sha256 [0-9a-f]{64}"):
        run_fetch(hub, tmp_path)
    folder = model_dir(tmp_path, SOURCE)
    assert not (folder / "model.safetensors").exists() and not (folder / "model.safetensors.partial").exists()
    assert not (folder / COMPLETE_MARKER).exists()

    hub.corrupt.clear()  # the next attempt (the init container's restart) starts over and succeeds
    run_fetch(hub, tmp_path)
    assert (folder / COMPLETE_MARKER).exists()


def test_a_changed_file_in_the_cache_is_fetched_again(hub: FakeHub, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    folder, _ = run_fetch(hub, tmp_path)
    (folder / "config.json").write_text("{}")
    (folder / COMPLETE_MARKER).unlink()
    _, log = run_fetch(hub, tmp_path)
    assert "config.json: downloaded and verified" in log and "model.safetensors: already here" in log
    assert same_files(folder, tiny_models["llama"])


def test_a_gated_model_needs_the_token(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with FakeHub({REPO: {"main": tiny_models["llama"]}}, token="hf_secret") as gated:
        with pytest.raises(ValueError, match="the Hub refused access \\(401\\); a gated or private model needs a token"):
            run_fetch(gated, tmp_path)
        folder, _ = run_fetch(gated, tmp_path, token="hf_secret")
        assert same_files(folder, tiny_models["llama"])


def test_the_cli_reads_hf_endpoint_and_the_token_file(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "token").write_text("hf_secret\n")
    with FakeHub({REPO: {"v1": tiny_models["llama"]}}, token="hf_secret") as gated:
        env = {**os.environ, "HF_ENDPOINT": gated.url}
        done = subprocess.run([sys.executable, "-m", "kvflock.cli", "fetch-model", f"hf://{REPO}@v1", "--cache-dir",
                               str(tmp_path / "cache"), "--token-file", str(tmp_path / "token")],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(tmp_path / "cache" / "tiny-org--tiny-llama" / "v1")
        missing = subprocess.run([sys.executable, "-m", "kvflock.cli", "fetch-model", "hf://tiny-org/nothing",
                                  "--cache-dir", str(tmp_path / "cache"), "--token-file", str(tmp_path / "token")],
                                 capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (f"kvflock fetch-model: error: tiny-org/nothing@main: no such model or "
                                      f"revision at {gated.url}")
