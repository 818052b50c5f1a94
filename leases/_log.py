"""The library's structlog loggers, created when the first line is logged.

Importing structlog imports rich (for its tracebacks): about a quarter of a second of a
cold start. A program that uses the library without logging through it (``leases list``,
``status``) should not pay that just for importing :mod:`leases`.
"""

from __future__ import annotations

from typing import Any


class LazyLogger:
    """``structlog.get_logger(name)``, imported and created on first use.

    Every attribute (``debug``, ``info``, ``warning``, ``bind``...) is structlog's own
    logger's, so the configuration in force when a line is logged applies, as with a
    logger made at import time.

    :param name: the logger's name (the module's ``__name__``).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, attribute: str) -> Any:
        if self._logger is None:
            import structlog  # noqa: PLC0415 - the point of this class

            self._logger = structlog.get_logger(self._name)
        return getattr(self._logger, attribute)


def get_logger(name: str) -> LazyLogger:
    """A :class:`LazyLogger` named ``name``."""
    return LazyLogger(name)
