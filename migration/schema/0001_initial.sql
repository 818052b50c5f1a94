-- registry-migrator schema 0001: repositories, the settings row, the events log.

CREATE TABLE container_repositories (
    id bigserial PRIMARY KEY,
    -- root-namespace/.../name, as the registry names it
    path text NOT NULL UNIQUE CHECK (path LIKE '_%/_%' AND length(path) <= 255),
    -- stored so the deny-list filter can be answered from an index (see the indexes below)
    root_namespace text GENERATED ALWAYS AS (split_part(path, '/', 1)) STORED,
    created_at timestamptz NOT NULL DEFAULT now(),
    tags_count integer NOT NULL DEFAULT 0 CHECK (tags_count >= 0),
    migration_state text NOT NULL DEFAULT 'default' CHECK (migration_state IN (
        'default', 'pre_importing', 'pre_import_done', 'importing', 'import_done',
        'import_aborted', 'import_skipped')),
    migration_pre_import_started_at timestamptz,
    migration_pre_import_done_at timestamptz,
    migration_import_started_at timestamptz,
    migration_import_done_at timestamptz,
    migration_aborted_at timestamptz,
    migration_skipped_at timestamptz,
    migration_aborted_in_state text CHECK (migration_aborted_in_state IN (
        'default', 'pre_importing', 'pre_import_done', 'importing')),
    migration_retries_count integer NOT NULL DEFAULT 0 CHECK (migration_retries_count >= 0),
    migration_skipped_reason text CHECK (migration_skipped_reason IN (
        'too_many_tags', 'too_many_retries', 'not_found', 'native_import',
        'migration_canceled', 'root_namespace_in_deny_list')),
    -- the highest fencing token (etcd create_revision) that wrote this row
    fencing_token bigint NOT NULL DEFAULT 0,
    -- when the last step was written; an active row whose step is old is stale
    last_step_at timestamptz,
    CHECK ((migration_state = 'import_skipped') = (migration_skipped_reason IS NOT NULL))
);

-- The state literals are written here and in the queries (never bind parameters): a
-- partial index is only usable when the planner can prove the query's predicate implies
-- the index's, which it cannot for a parameter under a generic plan.

-- Ready repositories in selection order; root_namespace is included so the deny-list
-- filter is checked on the index entry (index-only scan) instead of a heap visit.
CREATE INDEX container_repositories_ready
    ON container_repositories (created_at, id) INCLUDE (root_namespace)
    WHERE migration_state = 'default';

-- Aborted repositories, oldest abort first (they are retried before new ones start).
CREATE INDEX container_repositories_aborted
    ON container_repositories (migration_aborted_at, id) INCLUDE (root_namespace)
    WHERE migration_state = 'import_aborted';

-- In-flight repositories: counted by every claim (capacity) and scanned by the guard.
CREATE INDEX container_repositories_active
    ON container_repositories (last_step_at)
    WHERE migration_state IN ('pre_importing', 'pre_import_done', 'importing');

-- The last finished step (the reference's enqueue "waiting time").
CREATE INDEX container_repositories_last_step_done
    ON container_repositories ((GREATEST(migration_pre_import_done_at, migration_import_done_at,
                                         migration_aborted_at, migration_skipped_at)));

CREATE TABLE migration_settings (
    id integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    enabled boolean NOT NULL DEFAULT true,
    capacity integer NOT NULL DEFAULT 10 CHECK (capacity >= 0),
    enqueue_waiting_time double precision NOT NULL DEFAULT 0 CHECK (enqueue_waiting_time >= 0),
    created_before timestamptz,
    max_tags_count integer NOT NULL DEFAULT 0 CHECK (max_tags_count >= 0),
    max_retries integer NOT NULL DEFAULT 3 CHECK (max_retries >= 1),
    pre_import_timeout double precision NOT NULL DEFAULT 1800 CHECK (pre_import_timeout > 0),
    import_timeout double precision NOT NULL DEFAULT 600 CHECK (import_timeout > 0),
    max_step_duration double precision NOT NULL DEFAULT 300 CHECK (max_step_duration > 0),
    root_namespace_deny_list text[] NOT NULL DEFAULT '{}',
    lease_scope text NOT NULL DEFAULT 'repository' CHECK (lease_scope IN ('repository', 'global')),
    pending_enqueues integer CHECK (pending_enqueues >= 1),
    enqueue_interval double precision NOT NULL DEFAULT 60 CHECK (enqueue_interval > 0),
    guard_interval double precision NOT NULL DEFAULT 60 CHECK (guard_interval > 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO migration_settings (id) VALUES (1);

CREATE TABLE migration_events (
    id bigserial PRIMARY KEY,
    repository_id bigint NOT NULL REFERENCES container_repositories (id) ON DELETE CASCADE,
    from_state text,
    to_state text,
    event text NOT NULL,
    token bigint NOT NULL,
    actor text NOT NULL,
    message_id text,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    detail jsonb NOT NULL DEFAULT '{}',
    -- false: a fenced write that was refused (stale token or unexpected state); nothing
    -- else changed, and detail.reason says why
    accepted boolean NOT NULL
);
CREATE INDEX migration_events_repository ON migration_events (repository_id, id);
CREATE INDEX migration_events_refused ON migration_events (id) WHERE NOT accepted;
