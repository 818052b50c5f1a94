-- registry-migrator schema 0004: outcomes and timings as the reference records them.

-- A repository the registry already holds (native) or does not know (not found) needs no
-- more work: it ends in import_done with the reason kept in migration_skipped_reason, as
-- GitLab's finish_import_as does, so the totals match GitLab's own reports. Only those two
-- reasons may stand beside import_done.
ALTER TABLE container_repositories DROP CONSTRAINT container_repositories_check;
ALTER TABLE container_repositories ADD CONSTRAINT container_repositories_reason_check CHECK (
    CASE migration_state
        WHEN 'import_skipped' THEN migration_skipped_reason IS NOT NULL
        WHEN 'import_done' THEN migration_skipped_reason IS NULL
            OR migration_skipped_reason IN ('native_import', 'not_found')
        ELSE migration_skipped_reason IS NULL
    END);
-- Repositories an older release skipped for those reasons are done, with the reason kept;
-- their skip time is their done time. (No event: nothing moved at the registry.)
UPDATE container_repositories
    SET migration_state = 'import_done',
        migration_import_done_at = coalesce(migration_import_done_at, migration_skipped_at)
    WHERE migration_state = 'import_skipped'
      AND migration_skipped_reason IN ('native_import', 'not_found');

-- The enqueue waiting time counts the latest finished step of repositories in finished
-- states only (the reference's recently_done_migration_step): a repository that went on
-- from pre_import_done to importing no longer counts its pre-import's end.
DROP INDEX container_repositories_last_step_done;
CREATE INDEX container_repositories_last_step_done
    ON container_repositories ((GREATEST(migration_pre_import_done_at, migration_import_done_at,
                                         migration_aborted_at, migration_skipped_at)))
    WHERE migration_state IN ('pre_import_done', 'import_done', 'import_aborted', 'import_skipped');

-- The pre-import timeout may grow with the tag count (the reference's dynamic timeout):
-- pre_import_timeout + tags * pre_import_timeout_per_tag, at most pre_import_timeout_max
-- (when set). The defaults keep the fixed timeout.
ALTER TABLE migration_settings
    ADD COLUMN pre_import_timeout_per_tag double precision NOT NULL DEFAULT 0
        CHECK (pre_import_timeout_per_tag >= 0),
    ADD COLUMN pre_import_timeout_max double precision CHECK (pre_import_timeout_max > 0);
