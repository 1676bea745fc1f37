"""Logging set-up shared by the server process and the worker processes: text or JSON lines."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import deque
from datetime import datetime, timezone
from typing import NoReturn

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


# How many of a process's latest log lines get_logs() can return.
RECENT_LOG_LINES = 1000


class RecentLogBuffer(logging.Handler):
    """Keeps the process's last RECENT_LOG_LINES log lines, formatted, for WorkerWrapperBase.get_logs().

    A worker's owner (a Ray actor's, a pod's) can read them over RPC without access to its stderr.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=RECENT_LOG_LINES)
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the code that logs
            self.handleError(record)


def recent_log_buffer() -> RecentLogBuffer:
    """This process's RecentLogBuffer, attached to the root logger on first use."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, RecentLogBuffer):
            return handler
    buffer = RecentLogBuffer()
    root.addHandler(buffer)
    return buffer


def configure_logging(log_format: str, process: str) -> None:
    """Root logging for this process; ``process`` names it in text lines (server, worker0, ...)."""
    # transformers and diffusers print through handlers of their own, in their own format, as soon as they
    # are imported (diffusers warns then when torchao lacks a tensor type it knows).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {process} %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    recent_log_buffer()


def adopt_library_loggers() -> None:
    """Once torch is imported, before diffusers is: torch's loggers get a handler of torch's own (its own
    line format) that does not propagate, so their lines go through this process's handler instead; and
    torchao's import-time warnings about kernels built for GPUs it cannot load here are dropped."""
    torch_logger = logging.getLogger("torch")
    for handler in list(torch_logger.handlers):
        torch_logger.removeHandler(handler)
    torch_logger.propagate = True
    logging.getLogger("torchao").setLevel(logging.ERROR)


def describe_error(error: BaseException) -> str:
    """An error as replies and logs carry it: its type and message on one line."""
    return f"{type(error).__name__}: {error}"


def exit_at_once(code: int) -> NoReturn:
    """End a worker program that has shut its worker down: flush the logs and standard streams, then
    leave without the interpreter's teardown, which spends about a second unloading torch and diffusers
    (on every worker stop and restart)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
