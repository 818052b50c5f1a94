"""structlog configuration, in one place.

Every process calls :func:`configure` once at start. Lines are JSON on stdout; context
bound with ``structlog.contextvars.bind_contextvars`` (actor, message id, repository) is
carried into every line of a run.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


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
    # Our lines and the libraries' (pika, dramatiq, uvicorn log through stdlib) go out through
    # one stream under one lock, the stdlib handler's, so lines never interleave (two
    # writers with locks of their own did: ``{...}{...}``). Ours are rendered by structlog
    # and written straight to it: through stdlib logging (a LogRecord, findCaller's walk up
    # the stack, the handler chain, a formatter running the processors again) a line cost
    # about three times the CPU, ~5 % of a worker's (bench/pipeline.py's profile).
    handler = logging.StreamHandler(sys.stdout)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: HandlerStreamLogger(handler),
        cache_logger_on_first_use=True,
    )
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


class HandlerStreamLogger:
    """structlog's logger: writes each rendered line to a stdlib handler's stream, under
    that handler's lock (the one the libraries' lines take).

    :param handler: the stream handler the root logger writes through.
    """

    def __init__(self, handler: logging.StreamHandler[Any]) -> None:
        self._handler = handler

    def msg(self, message: str) -> None:
        """Write one line."""
        handler = self._handler
        handler.acquire()
        try:
            stream = handler.stream
            stream.write(message + "\n")
            stream.flush()
        finally:
            handler.release()

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg
