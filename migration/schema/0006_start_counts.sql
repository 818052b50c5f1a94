-- registry-migrator schema 0006: how many times each phase of a repository was started.
--
-- A registry notification may arrive late or twice (the registry retries it until one is
-- accepted). When the phase it reports on has been started more than once (a retry, a
-- requeue, a claim undone after a start whose answer was lost), it may come from an
-- earlier attempt, and the worker asks the registry whether the status is still its
-- current one before acting on it. When the phase was started exactly once, no earlier
-- attempt exists and that registry request is saved (migration.migrator.started_once).
--
-- The counts are never reset (a requeue leaves them, unlike the retries count), and are
-- raised by the one fenced write whenever it stamps the phase's started-at column
-- (p_arrival), in the same UPDATE: a claim, or the guard aligning the row with an import
-- the registry runs (counted too: a count may be higher than our starts, never lower).
-- Rows that exist before this version get the counts of their accepted claims in the
-- events log (every claim has been recorded there since 0001). A count of 0 on an active
-- row (a row written by hand) means "not known": the status is checked. Written to apply
-- again harmlessly (IF NOT EXISTS, the same counts).

ALTER TABLE container_repositories
    ADD COLUMN IF NOT EXISTS migration_pre_import_starts integer NOT NULL DEFAULT 0
        CHECK (migration_pre_import_starts >= 0),
    ADD COLUMN IF NOT EXISTS migration_import_starts integer NOT NULL DEFAULT 0
        CHECK (migration_import_starts >= 0);

UPDATE container_repositories AS repository SET
    migration_pre_import_starts = claims.pre_import,
    migration_import_starts = claims.final_import
FROM (
    SELECT repository_id,
           count(*) FILTER (WHERE to_state = 'pre_importing') AS pre_import,
           count(*) FILTER (WHERE to_state = 'importing') AS final_import
    FROM migration_events
    -- undone claims never arrive in an active state, so every such event stamped a start
    WHERE accepted AND to_state IN ('pre_importing', 'importing')
    GROUP BY repository_id
) AS claims
WHERE repository.id = claims.repository_id;

-- Schema 0005's function, its one change marked: the two counts in the UPDATE.
CREATE OR REPLACE FUNCTION migration_fenced_write(
    p_repository_id bigint,
    -- true for a claim: lock the settings row, check enabled and the capacity
    p_claim boolean,
    -- what the client computed the transition from (p_from_state: the state it expects)
    p_from_state text,
    p_from_retries integer,
    p_from_aborted_in text,
    -- the writer's fencing token; refused when a newer one wrote the row
    p_token bigint,
    -- the values to write; p_to_state NULL: record a refusal, write nothing
    p_to_state text,
    p_retries integer,
    p_aborted_in text,
    p_skipped_reason text,
    -- the timestamp column this arrival stamps with now(), or NULL
    p_arrival text,
    -- the events log
    p_event text,
    p_actor text,
    p_message_id text,
    p_detail jsonb,
    OUT outcome text,
    OUT repository container_repositories
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_enabled boolean;
    v_capacity integer;
    v_active bigint;
BEGIN
    IF p_claim AND p_to_state IS NOT NULL THEN
        -- Serializes claims (and only claims): the capacity is a hard bound.
        SELECT enabled, capacity INTO v_enabled, v_capacity
            FROM migration_settings WHERE id = 1 FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'migration_settings row missing';
        END IF;
    END IF;
    SELECT * INTO repository FROM container_repositories WHERE id = p_repository_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found';
        RETURN;
    END IF;
    IF repository.fencing_token > p_token THEN
        outcome := 'stale_token';
    ELSIF repository.migration_state <> p_from_state THEN
        outcome := 'state_changed';
    END IF;
    IF outcome IS NOT NULL THEN
        -- A refused write changes nothing but is recorded (index migration_events_refused).
        INSERT INTO migration_events (repository_id, from_state, to_state, event, token, actor,
                                      message_id, detail, accepted)
            VALUES (p_repository_id, repository.migration_state, NULL, p_event, p_token,
                    p_actor, p_message_id,
                    coalesce(p_detail, '{}'::jsonb) || jsonb_build_object(
                        'reason', outcome,
                        'expected_state', p_from_state,
                        'row_state', repository.migration_state,
                        'row_token', repository.fencing_token),
                    false);
        RETURN;
    END IF;
    IF p_to_state IS NULL
        OR repository.migration_retries_count <> p_from_retries
        OR repository.migration_aborted_in_state IS DISTINCT FROM p_from_aborted_in THEN
        outcome := 'mismatch';
        RETURN;
    END IF;
    IF p_claim THEN
        IF NOT v_enabled THEN
            outcome := 'disabled';
            RETURN;
        END IF;
        -- A fresh snapshot (this is a new statement): every committed claim is counted.
        -- The literals match the partial index container_repositories_active.
        SELECT count(*) INTO v_active FROM container_repositories
            WHERE migration_state IN ('pre_importing', 'pre_import_done', 'importing');
        IF v_active >= v_capacity THEN
            outcome := 'at_capacity';
            RETURN;
        END IF;
    END IF;
    UPDATE container_repositories SET
        migration_state = p_to_state,
        migration_retries_count = p_retries,
        migration_aborted_in_state = p_aborted_in,
        migration_skipped_reason = p_skipped_reason,
        fencing_token = p_token,
        last_step_at = now(),
        migration_pre_import_started_at = CASE WHEN p_arrival = 'migration_pre_import_started_at'
            THEN now() ELSE migration_pre_import_started_at END,
        migration_pre_import_done_at = CASE WHEN p_arrival = 'migration_pre_import_done_at'
            THEN now() ELSE migration_pre_import_done_at END,
        migration_import_started_at = CASE WHEN p_arrival = 'migration_import_started_at'
            THEN now() ELSE migration_import_started_at END,
        migration_import_done_at = CASE WHEN p_arrival = 'migration_import_done_at'
            THEN now() ELSE migration_import_done_at END,
        migration_aborted_at = CASE WHEN p_arrival = 'migration_aborted_at'
            THEN now() ELSE migration_aborted_at END,
        migration_skipped_at = CASE WHEN p_arrival = 'migration_skipped_at'
            THEN now() ELSE migration_skipped_at END,
        -- New in 0006: a claim that stamps a phase's start counts it.
        migration_pre_import_starts = migration_pre_import_starts
            + CASE WHEN p_arrival = 'migration_pre_import_started_at' THEN 1 ELSE 0 END,
        migration_import_starts = migration_import_starts
            + CASE WHEN p_arrival = 'migration_import_started_at' THEN 1 ELSE 0 END
    -- The fence again: the row is locked, so it always matches; it is there so that this
    -- statement alone can never write over a newer token.
    WHERE id = p_repository_id AND migration_state = p_from_state AND fencing_token <= p_token
    RETURNING * INTO STRICT repository;
    INSERT INTO migration_events (repository_id, from_state, to_state, event, token, actor,
                                  message_id, detail, accepted)
        VALUES (p_repository_id, p_from_state, p_to_state, p_event, p_token, p_actor,
                p_message_id, coalesce(p_detail, '{}'::jsonb), true);
    outcome := CASE WHEN p_claim THEN 'claimed' ELSE 'stepped' END;
END;
$$;
