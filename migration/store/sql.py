"""The store's SQL text: constants and small builders, with no pool or logging import
(``registry-migrator status`` reads through :mod:`migration.store.status` without them).

The state lists are literals built from :mod:`migration.states`, not parameters: the
partial indexes of the schema files are only used when the planner sees the same literals,
which tests/unit/test_schema_vocabulary.py checks.
"""

from __future__ import annotations

from functools import lru_cache

from psycopg import sql

from migration.states import ACTIVE_STATES, FINISHED_STATES, State
from migration.store.model import Candidate, Seen


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

COUNT_ACTIVE = f"SELECT count(*) FROM container_repositories WHERE migration_state IN {ACTIVE_SQL}"  # noqa: S608 - constants only
# An active row with no last_step_at (written outside the project, e.g. imported from
# GitLab's tables) is stale too, and first: the reference counts nil as stale.
SELECT_STALE = (
    f"SELECT * FROM container_repositories WHERE migration_state IN {ACTIVE_SQL}"  # noqa: S608
    " AND (last_step_at IS NULL OR last_step_at < now() - make_interval(secs => %(age)s))"
    " ORDER BY last_step_at NULLS FIRST LIMIT %(limit)s"
)
# Active repositories whose latest accepted write came from one message: what a delivery of
# that message left behind (partial index on the active states, then each one's last event).
SELECT_LAST_WRITTEN_BY = (
    f"SELECT r.* FROM container_repositories r WHERE r.migration_state IN {ACTIVE_SQL}"  # noqa: S608
    " AND (SELECT e.message_id FROM migration_events e WHERE e.repository_id = r.id"
    " AND e.accepted ORDER BY e.id DESC LIMIT 1) = %(message_id)s ORDER BY r.id"
)
# How many times a fenced write reads the row again after the function found it moved
# since the read (each time another write got in between; more in a row is a bug).
# max_retries setting (an abort needs it) in the same round trip.
READ_FOR_WRITE = (
    "SELECT r.*, (SELECT max_retries FROM migration_settings WHERE id = 1)"
    " AS settings_max_retries FROM container_repositories r WHERE r.id = %s"
)


def fenced_call(repository_id: str, prefix: str = "") -> str:
    """A call of schema 0005's function, its parameters named ``%(<prefix>claim)s`` etc.
    Every argument is cast so that the call resolves whatever types the driver sends.

    :param repository_id: the SQL for the row's id (a parameter, or a column of a row
        the statement read before).
    """
    p = prefix
    return (
        f"migration_fenced_write({repository_id},"
        f" %({p}claim)s::boolean, %({p}from)s::text, %({p}from_retries)s::integer,"
        f" %({p}from_aborted_in)s::text, %({p}token)s::bigint, %({p}to)s::text,"
        f" %({p}retries)s::integer, %({p}aborted_in)s::text, %({p}reason)s::text,"
        f" %({p}arrival)s::text, %({p}event)s::text, %({p}actor)s::text,"
        f" %({p}message_id)s::text, %({p}detail)s::jsonb)"
    )


#: A repository's row by id.
SELECT_ONE = "SELECT * FROM container_repositories WHERE id = %s"
FENCED_WRITE = f"SELECT w.outcome, (w.repository).* FROM {fenced_call('%(id)s::bigint')} AS w"  # noqa: S608


def fenced_writes(*, writes: int, seen_if: str | None) -> str:
    """Fenced writes of one row in one round trip, each (parameters ``w<k>_*``) called only
    when the one before was written. With ``seen_if``, the statement reads the row first and
    calls the first only when ``seen_if`` (SQL on ``seen``, the row as read) holds; the
    function then checks the row again under its locks, as for any write. Each call after
    the first sees the writes before it: every statement in the VOLATILE function takes a
    new snapshot.

    Rows: (n, outcome, the repository's columns); n = -1 for the row as read (outcome
    'read'), n = k for write k when it was called.
    """
    ctes = []
    if seen_if is None:
        first = f"FROM {fenced_call('%(id)s::bigint', 'w0_')} AS f"
    else:
        ctes.append("seen AS (SELECT * FROM container_repositories WHERE id = %(id)s::bigint)")
        first = f"FROM seen, LATERAL {fenced_call('seen.id', 'w0_')} AS f WHERE {seen_if}"
    ctes.append(f"w0 AS (SELECT f.outcome, (f.repository).* {first})")
    for k in range(1, writes):
        ctes.append(
            f"w{k} AS (SELECT f.outcome, (f.repository).* FROM w{k - 1},"  # noqa: S608 - no input
            f" LATERAL {fenced_call(f'w{k - 1}.id', f'w{k}_')} AS f"
            f" WHERE w{k - 1}.outcome IN ('claimed', 'stepped'))"
        )
    rows = [f"SELECT {k} AS n, w{k}.* FROM w{k}" for k in range(writes)]  # noqa: S608
    if seen_if is not None:
        rows.insert(0, "SELECT -1 AS n, 'read' AS outcome, seen.* FROM seen")
    return f"WITH {', '.join(ctes)} {' UNION ALL '.join(rows)} ORDER BY n"


# A pre_import_complete's two steps (pre_import_done, then the final import's start).
FENCED_WRITE_TWICE = fenced_writes(writes=2, seen_if=None)
# A claim made from a candidates' list entry in the round trip that reads the row: only
# when the row still shows what the claim was computed from (state, retries, aborted-in
# state) and has no more than %(max_tags)s tags (0: no bound). Otherwise nothing is written
# or recorded: the list was stale, and the caller decides again on the row.
CLAIM_AS_LISTED = fenced_writes(
    writes=1,
    seen_if="seen.migration_state = %(w0_from)s::text"
    " AND seen.migration_retries_count = %(w0_from_retries)s::integer"
    " AND seen.migration_aborted_in_state IS NOT DISTINCT FROM %(w0_from_aborted_in)s::text"
    " AND (%(max_tags)s::integer = 0 OR seen.tags_count <= %(max_tags)s::integer)",
)
#: The columns a notification carries as the API read them (``Seen``), and the check that
#: the row still shows them, and the notified path, under the worker's lease.
SEEN_COLUMNS = Seen._fields
_SEEN_IF = " AND ".join(
    ["seen.path = %(path)s::text"]
    + [f"seen.{c} IS NOT DISTINCT FROM %(seen_{c})s" for c in SEEN_COLUMNS]
)
# Steps applied as a notification's API saw the row, with the read that checks it.
STEPS_AS_SEEN = {n: fenced_writes(writes=n, seen_if=_SEEN_IF) for n in (1, 2)}

# A registry fault's backoff: 5 s * 2^(faults so far), capped, then scaled by 0.5-1 (equal
# jitter). The exponent is capped too, so a repository failing for days cannot overflow it.
BACK_OFF = (
    "UPDATE container_repositories SET registry_failures = registry_failures + 1,"
    " registry_last_error = %(error)s,"
    " registry_not_before = now() + make_interval(secs => least("
    "(SELECT registry_backoff_max FROM migration_settings WHERE id = 1),"
    " 5 * power(2, least(registry_failures, 20))) * (0.5 + random() / 2))"
    " WHERE id = %(id)s AND fencing_token <= %(token)s RETURNING *"
)

# First in line: an aborted row just before the oldest abort (candidates take aborted rows
# by migration_aborted_at), and no registry backoff for either kind.
TO_FRONT = (
    "UPDATE container_repositories SET registry_failures = 0, registry_not_before = NULL,"
    " registry_last_error = NULL, fencing_token = %(token)s,"
    " migration_aborted_at = CASE WHEN migration_state = 'import_aborted' THEN"
    " (SELECT coalesce(min(migration_aborted_at), now()) - interval '1 second'"
    "  FROM container_repositories WHERE migration_state = 'import_aborted')"
    " ELSE migration_aborted_at END"
    " WHERE id = %(id)s AND fencing_token <= %(token)s"
    " AND migration_state IN ('import_aborted', 'default') RETURNING *"
)


#: The candidates' columns, in :class:`Candidate`'s order: its fields but the last,
#: ``order_at``, which is each part's first order column.
CANDIDATE_COLUMNS = Candidate._fields[:-1]


def select_ordered(
    *, state: str, order: tuple[str, str], deny: bool, cutoff: bool, limit: int
) -> sql.Composed:
    # The state is a literal (see the schema's note on partial indexes); the optional
    # filters are left out of the text rather than disabled with an OR, for the same reason.
    # The limit is a literal too: under a generic plan a parameter limit is assumed large,
    # and the outer lookup by id turns into a hash join over a sequential scan.
    assert state in {"default", "import_aborted"}
    filters: list[sql.Composable] = [sql.SQL("migration_state = {}").format(sql.Literal(state))]
    if cutoff:
        filters.append(sql.SQL("created_at < %(cutoff)s"))
    if deny:
        filters.append(sql.SQL("root_namespace <> ALL(%(deny)s::text[])"))
    # A repository backing off after registry faults waits (invariant 7).
    filters.append(sql.SQL("(registry_not_before IS NULL OR registry_not_before <= now())"))
    order_by = sql.SQL(", ").join(sql.Identifier(c) for c in order)
    return sql.SQL(
        "SELECT {columns}, {order_at} AS order_at FROM container_repositories WHERE id IN ("
        " SELECT id FROM container_repositories WHERE {filters} ORDER BY {order} LIMIT {limit})"
        " ORDER BY {order}"
    ).format(
        columns=sql.SQL(", ").join(sql.Identifier(c) for c in CANDIDATE_COLUMNS),
        order_at=sql.Identifier(order[0]),
        filters=sql.SQL(" AND ").join(filters), order=order_by, limit=sql.Literal(int(limit)),
    )  # fmt: skip


@lru_cache(maxsize=64)
def candidates_query(*, deny: bool, cutoff: bool, limit: int) -> bytes:
    """Aborted and ready candidates in one round trip (each part on its partial index), as
    text composed once per shape: composing it is a good part of a claim's client CPU."""
    query = sql.SQL("({}) UNION ALL ({})").format(
        select_ordered(state="import_aborted", order=("migration_aborted_at", "id"),
                       deny=deny, cutoff=False, limit=limit),
        select_ordered(state="default", order=("created_at", "id"), deny=deny,
                       cutoff=cutoff, limit=limit),
    )  # fmt: skip
    return query.as_bytes(None)
