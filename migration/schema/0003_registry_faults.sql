-- registry-migrator schema 0003: the registry's failures are not the repository's (invariant 7).
--
-- A registry fault (unreachable, timeout, 5xx, 401/403, an answer that is not the API's)
-- undoes the claim and charges no retry. So that one repository that keeps failing does not
-- hammer the registry, it backs off: registry_not_before is the earliest time a run may pick
-- it again (exponential with jitter, capped by the registry_backoff_max setting), reset by
-- the next answer that is not a registry fault. registry_last_error says why, for status and
-- `repositories show`.

ALTER TABLE container_repositories
    ADD COLUMN registry_failures integer NOT NULL DEFAULT 0 CHECK (registry_failures >= 0),
    ADD COLUMN registry_not_before timestamptz,
    ADD COLUMN registry_last_error text;

-- The candidate indexes carry registry_not_before so that the backoff filter is checked on
-- the index entry, as the deny-list filter is.
DROP INDEX container_repositories_ready;
CREATE INDEX container_repositories_ready
    ON container_repositories (created_at, id) INCLUDE (root_namespace, registry_not_before)
    WHERE migration_state = 'default';
DROP INDEX container_repositories_aborted;
CREATE INDEX container_repositories_aborted
    ON container_repositories (migration_aborted_at, id) INCLUDE (root_namespace, registry_not_before)
    WHERE migration_state = 'import_aborted';
-- Repositories backing off, for status (few rows; most have NULL).
CREATE INDEX container_repositories_backing_off
    ON container_repositories (registry_not_before) WHERE registry_not_before IS NOT NULL;

ALTER TABLE migration_settings
    -- why the system paused the migration (enabled = false), e.g. the registry refused our
    -- token; NULL when the operator paused it or it runs. `resume` clears it.
    ADD COLUMN paused_reason text,
    -- the longest the shared registry breaker stays open before the next probe
    ADD COLUMN registry_breaker_max_window double precision NOT NULL DEFAULT 60
        CHECK (registry_breaker_max_window > 0),
    -- the longest one repository backs off after registry faults
    ADD COLUMN registry_backoff_max double precision NOT NULL DEFAULT 300
        CHECK (registry_backoff_max > 0);
