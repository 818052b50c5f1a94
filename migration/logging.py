"""structlog configuration, in one place.

Every process calls :func:`configure` once at start. Lines are JSON on stdout; context
bound with ``structlog.contextvars.bind_contextvars`` (actor, message id, repository) is
carried into every line of a run.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


#: One lock for every line written to stdout, by structlog and by the stdlib handler alike:
#: a text stream is not thread-safe, and two writers with locks of their own interleave
#: their lines (``{...}{...}``), which breaks every consumer of the JSON lines.
_STDOUT_LOCK = threading.RLock()


class _LineWriter:
    """A structlog logger that writes each message as one line under :data:`_STDOUT_LOCK`."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        with _STDOUT_LOCK:
            self._stream.write(message + "\n")
            self._stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _line_writer_factory(*_args: Any) -> _LineWriter:
    return _LineWriter(sys.stdout)


def configure(level: str = "info", *, json: bool = True) -> None:
    """Configure structlog (and stdlib logging of libraries) to write one JSON object a line.

    :param level: debug, info, warning or error.
    :param json: JSON lines (services); False gives a console renderer for people.
    """
    numeric = _LEVELS.get(level, logging.INFO)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_line_writer_factory,
        cache_logger_on_first_use=True,
    )
    # Libraries (pika, dramatiq, uvicorn) log through stdlib: render them the same way.
    handler = logging.StreamHandler(sys.stdout)
    handler.lock = _STDOUT_LOCK  # Handler.handle() writes under it: the same lock as structlog
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO) if numeric > logging.DEBUG else numeric)
    logging.getLogger("pika").setLevel(logging.WARNING)
