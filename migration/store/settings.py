"""The live settings row (``migration_settings``)."""

from __future__ import annotations

from psycopg import sql
from psycopg.rows import kwargs_row

from migration import settings as settings_module
from migration.settings import Settings
from migration.store.base import StoreBase, log
from migration.store.model import StoreError


class SettingsMixin(StoreBase):
    """The live settings row."""

    def settings(self) -> Settings:
        """The live settings (read from the database on every call)."""
        with self._connection() as conn:
            cur = conn.cursor(row_factory=kwargs_row(Settings.from_row))
            row = cur.execute("SELECT * FROM migration_settings WHERE id = 1").fetchone()
        if row is None:
            raise StoreError(
                "the migration_settings row is missing; run `registry-migrator db upgrade`"
            )
        return row

    def update_settings(self, **changes: object) -> Settings:
        """Validate and write settings; return the settings after.

        :param changes: setting name -> value (typed, or strings as a command line gives).
        :raises SettingsError: an unknown key or a bad value; nothing is changed.
        """
        values = settings_module.validate(changes)
        if values.get("enabled") is True:
            values["paused_reason"] = None  # a resume ends a pause the system made, too
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(key), sql.Placeholder(key)) for key in values
        )
        query = sql.SQL(
            "UPDATE migration_settings SET {}, updated_at = now() WHERE id = 1 RETURNING *"
        ).format(assignments)
        with self._connection() as conn:
            cur = conn.cursor(row_factory=kwargs_row(Settings.from_row))
            row = cur.execute(query, values).fetchone()
        assert row is not None
        log.info("settings_changed", changes={k: str(v) for k, v in values.items()})
        return row

    def pause(self, reason: str) -> bool:
        """Pause the migration (``enabled = false``) for ``reason``, as the system does when
        the registry refuses our token; ``resume`` (enabled=true) clears the reason.

        :returns: True when this call paused it (it was running), False when already paused.
        """
        with self._connection() as conn:
            row = conn.execute(
                "UPDATE migration_settings SET enabled = false, paused_reason = %s,"
                " updated_at = now() WHERE id = 1 AND enabled RETURNING id",
                (reason[:500],),
            ).fetchone()
        return row is not None
