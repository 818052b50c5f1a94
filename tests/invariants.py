"""The invariant checks live in :mod:`devtools.invariants` (``bench/`` uses them too and
imports nothing from ``tests/``); this name stays for the tests that import it from here."""

from devtools.invariants import *  # noqa: F403
