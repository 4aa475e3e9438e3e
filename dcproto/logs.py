"""Logging set-up for the server and the worker: ``--log-format text`` (the default) or
``json``, one object per line for a log collector (journald, Loki, Elasticsearch...).

A JSON line holds ``ts`` (ISO 8601, UTC), ``level``, ``logger`` and ``message`` (the message
with its arguments filled in), then any fields given with ``extra=`` (``log.info("...",
extra={"project_id": pid})``), and ``exc_info`` / ``stack_info`` as text when there are any.
Values JSON cannot hold are written as their ``repr``.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

# the attributes every LogRecord has: anything else on a record came with extra=
_STANDARD = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=repr, ensure_ascii=False)


def configure_logging(
    level: str | int = "INFO", fmt: str = "text", stream: TextIO | None = None
) -> None:
    """Log to ``stream`` (stderr) at ``level``, as text or JSON lines; replaces the root
    logger's handlers (what ``logging.basicConfig`` set before, say)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, not {fmt!r}")
    if isinstance(level, str):
        level = level.upper()
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
