"""Refuse messages whose arguments do not fit their actor, before the actor runs.

A message published by hand, by an older version or by mistake may name a real actor
with the wrong arguments. Called as is, it fails with a TypeError deep inside the step
(or worse, half-way through it), and the Retries middleware sends it round again and again
with a traceback each time. This middleware checks the arguments against the actor's
signature and type hints first; a message that does not fit is logged once
(``message_rejected``) and goes straight to the dead-letter queue (``<queue>.XQ``).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from typing import Any

import dramatiq
import structlog
from dramatiq.middleware import Middleware, SkipMessage

log = structlog.get_logger(__name__)


def _fits(value: object, hint: object) -> bool:
    """Whether ``value`` (decoded from JSON) fits the type hint ``hint``.

    Only the hints actors use are understood (str, int, float, bool, None and unions of
    them); any other hint accepts anything.
    """
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


@functools.cache
def _signature(fn: Any) -> tuple[inspect.Signature, dict[str, Any]]:
    # Once per actor: resolving string annotations on every message would cost for nothing.
    return inspect.signature(fn), typing.get_type_hints(fn)


def argument_problem(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """What is wrong with calling ``fn(*args, **kwargs)``, or None when the call fits.

    :param fn: the actor's function.
    :param args: positional arguments from the message.
    :param kwargs: keyword arguments from the message.
    """
    signature, hints = _signature(fn)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        return str(error)
    for name, value in bound.arguments.items():
        hint = hints.get(name)
        if hint is not None and not _fits(value, hint):
            return f"argument {name}={value!r:.80} is not {hint}"
    return None


class ArgumentCheck(Middleware):
    """Dead-letters messages whose arguments do not fit their actor (see the module doc)."""

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        try:
            actor = broker.get_actor(message.actor_name)
        except dramatiq.ActorNotFound:
            return  # the worker itself dead-letters messages for unknown actors
        args = message.args if isinstance(message.args, tuple | list) else None
        kwargs = message.kwargs if isinstance(message.kwargs, dict) else None
        problem = (
            "args is not a list or kwargs not an object"
            if args is None or kwargs is None
            else argument_problem(actor.fn, tuple(args), kwargs)
        )
        if problem is None:
            return
        log.error(
            "message_rejected",
            reason=problem,
            actor=message.actor_name,
            message_id=message.message_id,
            queue_name=message.queue_name,
            to="dead-letter queue",
        )
        message.fail()
        if args is None or kwargs is None:
            # Dramatiq logs the skipped message with str(message), which iterates args and
            # calls kwargs.items(): a body with other shapes made that log call raise (a
            # "Logging error" traceback). Only the in-memory copy changes: RabbitMQ
            # dead-letters the original delivery, body untouched.
            message._message = message._message.copy(
                args=(f"<malformed args: {message.args!r:.80}>",),
                kwargs={"malformed_kwargs": f"{message.kwargs!r:.80}"},
            )
        raise SkipMessage(problem)
