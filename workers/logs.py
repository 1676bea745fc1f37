"""Logging set-up shared by the server process and the worker processes: text or JSON lines."""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from datetime import datetime, timezone

# Attributes every LogRecord has; anything else was passed with extra= and goes into the JSON line
# (except uvicorn's copy of its message with terminal colours).
_STANDARD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the fields given with ``extra=``."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRIBUTES})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


# This process's newest log lines, formatted as they were printed: what WorkerWrapperBase.get_logs returns.
RECENT_LOG_LINES: deque[str] = deque(maxlen=1000)


class _RecentLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        RECENT_LOG_LINES.append(self.format(record))


def configure_logging(log_format: str, process: str) -> None:
    """Root logging for this process; ``process`` names it in text lines (server, worker0, ...)."""
    # transformers prints through a handler of its own, in its own format, as soon as it is imported.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {process} %(name)s %(levelname)s %(message)s"))
    recent = _RecentLines()
    recent.setFormatter(handler.formatter)
    logging.basicConfig(level=logging.INFO, handlers=[handler, recent], force=True)
