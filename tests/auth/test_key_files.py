"""Key files: one key per line, comments and blank lines skipped, an empty file refused."""

from __future__ import annotations

import pytest

from kvflock.shared.auth import API_KEY_FILE_ENV, AccessPolicy, keys_from, read_keys


def test_a_key_file_holds_one_key_per_line_with_comments(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team a\nsk-one\n\n  sk-two  \n# rotated out: sk-old\n")
    assert read_keys(path) == (b"sk-one", b"sk-two")


def test_a_key_file_without_keys_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        read_keys(path)


def test_the_environment_names_the_key_file_when_the_flag_does_not(tmp_path, monkeypatch):
    path = tmp_path / "keys"
    path.write_text("sk-env\n")
    monkeypatch.setenv(API_KEY_FILE_ENV, str(path))
    assert keys_from(None, API_KEY_FILE_ENV) == (b"sk-env",)
    monkeypatch.delenv(API_KEY_FILE_ENV)
    assert keys_from(None, API_KEY_FILE_ENV) == ()


def test_an_admin_token_equal_to_a_user_key_is_refused():
    with pytest.raises(ValueError, match="admin token"):
        AccessPolicy(api_keys=(b"sk-same",), admin_tokens=(b"sk-same",))
