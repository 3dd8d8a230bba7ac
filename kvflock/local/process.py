"""Local processes that stand in for containers: started in their own session, logged to a
file, stopped gracefully and then killed, the whole process group with them.

A container's processes die with it; a process started here gets its own session (process
group), so that stopping it also ends whatever it spawned (a worker's tensor-parallel ranks).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

_ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL|FATAL|Traceback|\w*Error|\w*Exception)\b")

__all__ = ["ManagedProcess", "exit_code", "free_port", "kill_leftovers", "resolve_command"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def resolve_command(name: str) -> str | None:
    """The executable for a container's command: this Python environment's scripts first
    (where `kvflock` lives, as it would in the image), then PATH."""
    if os.sep in name:
        return name if os.access(name, os.X_OK) else None
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which(name, path=search)


def exit_code(returncode: int) -> int:
    """A Popen return code as a container's exit code: a signal N reads as 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class ManagedProcess:
    """One process in its own session, its stdout and stderr appended to `log_path`.

    While it runs, ``<pid_dir>/<pid>`` holds its command line, so that `kill_leftovers` can
    end it should the process that started it die without stopping it.
    """

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path,
                 pid_dir: Path | None = None) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.pid_dir = pid_dir
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        if self.pid_dir is not None:
            self.pid_dir.mkdir(parents=True, exist_ok=True)
            (self.pid_dir / str(self._popen.pid)).write_text("\0".join(self.argv))

    def _ended(self) -> None:
        assert self._popen is not None
        self._signal_group(signal.SIGKILL)  # what it left behind goes with it
        if self.pid_dir is not None:
            (self.pid_dir / str(self._popen.pid)).unlink(missing_ok=True)

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def poll(self) -> int | None:
        """The exit code once the process ended (128 + N after signal N), else None."""
        if self._popen is None:
            return None
        code = self._popen.poll()
        if code is None:
            return None
        self._ended()
        return exit_code(code)

    def _signal_group(self, signum: signal.Signals) -> None:
        assert self._popen is not None
        try:
            os.killpg(self._popen.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace_seconds: float) -> int | None:
        """SIGTERM the process group, SIGKILL it after `grace_seconds`; the exit code."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._popen.wait(timeout=max(0.0, grace_seconds))
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self._popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        code = self._popen.poll()
        if code is None:
            return None
        self._ended()
        return exit_code(code)

    def last_error(self, lines: int = 40, limit: int = 1024) -> str:
        """A crashed container's termination message, from the end of its log (as Kubernetes'
        FallbackToLogsOnError), condensed to the last line that reports an error, if any."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(0, size - 16 * limit))
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return ""
        tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
        errors = [line for line in tail if _ERROR_LINE.search(line)]
        return (errors[-1] if errors else "\n".join(tail[-3:]))[-limit:]


def kill_leftovers(pid_dir: Path) -> list[int]:
    """SIGKILL the process groups that `ManagedProcess` recorded in `pid_dir` and that still
    run the recorded command as their session's leader; the pids killed."""
    killed = []
    for entry in sorted(pid_dir.glob("*")) if pid_dir.is_dir() else []:
        pid = int(entry.name) if entry.name.isdigit() else 0
        try:
            running = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode("utf-8", "replace")
            ours = pid > 0 and os.getsid(pid) == pid and running == entry.read_text()
        except (OSError, ValueError):
            ours = False
        if ours:
            try:
                os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        entry.unlink(missing_ok=True)
    return killed
