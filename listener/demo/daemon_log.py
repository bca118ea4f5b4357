"""The daemon's log during the demo: JSON lines in a file of the work folder
(the screen belongs to the view); its warnings and errors are shown at the end."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import IO

from listener import logs
from listener.config import LogFormat

# aiomqtt warns each time more than 10 publishes wait for their PUBACK: normal
# for the daemon, which publishes the outbox in batches.
_NOISE = re.compile(r"There are \d+ pending publish calls")
SHOWN = 10  # warning and error lines shown at most


class DaemonLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def open(self, level: str) -> None:
        """Send this process' logs (the daemon runs in it) to the file."""
        self._file = self.path.open("a", encoding="utf-8")
        logs.configure(level, LogFormat.JSON, stream=self._file)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def problems(self, limit: int = SHOWN) -> list[str]:
        """Warning and error lines of the log, at most `limit`."""
        try:
            text = self.path.read_text(errors="replace")
        except OSError:
            return []
        found = [shown for shown in map(_problem, text.splitlines()) if shown is not None]
        return found[:limit]


def _problem(raw: str) -> str | None:
    """The line as shown if it is a warning or an error, else None."""
    try:
        entry = json.loads(raw)
    except ValueError:  # a library's line through the standard logging module
        if raw.startswith(("ERROR:", "CRITICAL:")) or (raw.startswith("WARNING:") and not _NOISE.search(raw)):
            return raw.strip()[:300]
        return None
    if isinstance(entry, dict) and entry.get("level") in ("warning", "error", "critical"):
        rest = {k: v for k, v in entry.items() if k not in ("event", "level", "timestamp")}
        return f"{entry.get('level')}: {entry.get('event')} {rest}"[:300]
    return None
