"""Schema upgrades (``db upgrade``) and the check a process makes at start-up."""

from __future__ import annotations

from migration.store.base import StoreBase, log
from migration.store.versions import applied_versions, require_versions, schema_files

# Key of the advisory lock that serializes schema upgrades (any fixed bigint will do).
_UPGRADE_LOCK = 0x5245_4D49_4752_0001


class SchemaMixin(StoreBase):
    """Schema upgrades and versions."""

    def upgrade(self) -> list[str]:
        """Apply the schema files not applied yet, in order; return the versions applied.

        Idempotent. One transaction under an advisory lock, so concurrent upgraders wait
        for each other and the second finds nothing to do.
        """
        applied_now: list[str] = []
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_UPGRADE_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for version, text in schema_files():
                if version in applied:
                    continue
                conn.execute(text.encode())  # several statements: simple query protocol
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                applied_now.append(version)
        if applied_now:
            log.info("schema_upgraded", versions=applied_now)
        return applied_now

    def schema_versions(self) -> list[str]:
        """The versions applied so far (empty before the first upgrade)."""
        with self._connection() as conn:
            return applied_versions(conn)

    def require_schema(self) -> None:
        """Refuse to work against a schema older than this release needs.

        Called at start-up by the workers, the API, the scheduler and the commands that
        use the store (not by ``db upgrade``, which is the fix).

        :raises SchemaOutdated: a version of :func:`schema_files` is not applied; the
            message names it and says to run ``registry-migrator db upgrade``.
        """
        require_versions(self.schema_versions())
