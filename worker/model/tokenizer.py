"""A model's tokenizer: from its folder, from another one named by the user, or converted from
its GGUF file and cached, so that a restarted worker does not convert it again; and the chat
template a user gives instead of the tokenizer's."""

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kvflock.worker.model import gguf_file
from kvflock.worker.model.source import ModelSource

log = logging.getLogger(__name__)


def load_tokenizer(source: ModelSource, tokenizer: str | None = None) -> Any:
    """The AutoTokenizer for the model, or None for a folder that has no tokenizer files."""
    if source.format == "gguf" and tokenizer is None:
        return _gguf_tokenizer(source) if gguf_file.has_tokenizer(source.gguf_reader) else None
    from transformers import AutoTokenizer  # imported here: it indexes every model transformers knows

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(tokenizer)
    has_files = any((source.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    return AutoTokenizer.from_pretrained(str(source.path)) if has_files else None


def tokenizer_cache_dir() -> Path:
    """Where converted GGUF tokenizers are kept: $KVFLOCK_CACHE_DIR, else the user's cache folder."""
    root = os.environ.get("KVFLOCK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvflock")
    return Path(root) / "tokenizers"


def _gguf_tokenizer(source: ModelSource) -> Any:
    """The GGUF file's tokenizer. Converting its vocabulary takes seconds (5 s for SmolLM2 here),
    which a restarted worker would pay on every start; the converted tokenizer is kept in a
    cache folder, keyed by the file's path, size and modification time and by the transformers
    version, and read back in a tenth of a second. Without a writable cache it is converted
    each time. The cached copy is always a fast tokenizer, read as one: AutoTokenizer would
    first index every model transformers knows (1.7 s of CPU on each start)."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    path = source.gguf_path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()
    cached = tokenizer_cache_dir() / key[:24]
    if (cached / "tokenizer_config.json").exists():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(cached))
        except (OSError, ValueError) as exc:
            log.warning("ignoring the cached tokenizer at %s: %s", cached, exc)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.path), gguf_file=source.gguf_name)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{cached.name}-"))
    except OSError as exc:
        log.debug("tokenizer not cached (%s)", exc)
        return tokenizer
    try:  # written beside, then renamed: a worker starting at the same time never reads half a folder
        tokenizer.save_pretrained(str(staging))
        staging.rename(cached)
    except OSError as exc:  # e.g. another worker renamed its copy first
        log.debug("tokenizer not cached (%s)", exc)
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


def read_chat_template(setting: str | None) -> str | None:
    """The chat template of EngineConfig.chat_template: the file it names, or the setting itself
    when it is a Jinja template. A ValueError naming the setting when it is neither."""
    if setting is None:
        return None
    if "{{" in setting or "{%" in setting:
        return setting
    path = Path(setting).expanduser()
    try:
        return path.read_text()
    except OSError as exc:
        raise ValueError(f"chat_template: {setting!r} is neither a Jinja template nor a readable file "
                         f"({exc.strerror})") from None
