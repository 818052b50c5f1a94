"""SQL text shared by the store and the read-only status, with no driver or logging import
(``registry-migrator status`` imports it without psycopg's pool or structlog).

The state lists are literals built from :mod:`migration.states`, not parameters: the
partial indexes of the schema files are only used when the planner sees the same literals,
which tests/unit/test_schema_vocabulary.py checks.
"""

from __future__ import annotations

from migration.states import ACTIVE_STATES, FINISHED_STATES, State


def sql_list(states: frozenset[State]) -> str:
    """``('a', 'b')``: the states as SQL literals, in a stable order."""
    return "(" + ", ".join(f"'{s.value}'" for s in sorted(states)) + ")"


#: The active states (partial index container_repositories_active).
ACTIVE_SQL = sql_list(ACTIVE_STATES)
# The finished states whose latest step starts the enqueue waiting time (the reference's
# recently_done_migration_step); the partial expression index
# container_repositories_last_step_done (schema 0004) has the same literals.
FINISHED_SQL = sql_list(FINISHED_STATES)
#: True when the waiting time (%(wait)s seconds) has passed at %(now)s (None: the server's
#: now()). Reads the expression index container_repositories_last_step_done.
WAITING_TIME_PASSED_SQL = (
    # max() of an indexed expression is one step down the index, whatever the plan; an
    # EXISTS with a range condition can be planned as a scan under a generic plan.
    "SELECT coalesce(max(GREATEST(migration_pre_import_done_at, migration_import_done_at,"  # noqa: S608 - constants only
    " migration_aborted_at, migration_skipped_at))"
    " <= coalesce(%(now)s::timestamptz, now()) - make_interval(secs => %(wait)s), true)"
    " AS passed FROM container_repositories"
    f" WHERE migration_state IN {FINISHED_SQL}"
)
