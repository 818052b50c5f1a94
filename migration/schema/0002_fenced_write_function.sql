-- registry-migrator schema 0002: a fenced write (claim or step) in one round trip.
--
-- Store.claim used to hold the settings-row lock across five client round trips (lock,
-- row lock, count, update, insert, commit), so claims queued behind the client's speed.
-- This function does the locked part on the server: the lock is held for the server's
-- work only. The client computes the transition (migration/states.py is the one state
-- machine) from a row it read without a lock, and passes both the values it computed
-- FROM (state, retries count, aborted-in state) and the values to write. The function
-- writes only when the locked row still has those values and the token is not stale;
-- otherwise it writes nothing and answers 'mismatch', and the client takes the locked
-- path, which records refusals as before.
--
-- VOLATILE plpgsql: under READ COMMITTED every statement inside takes a fresh snapshot,
-- so the count of active repositories, made after the settings lock is granted, sees
-- every claim committed before it (a single SQL statement would count with the snapshot
-- taken before waiting for the lock, and could pass the capacity).
--
-- Lock order is the locked path's: settings row, then repository row (no deadlock with it).
--
-- Outcomes: 'claimed' / 'stepped' (written; repository is the row after), 'disabled' and
-- 'at_capacity' (claims only; nothing written; repository is the locked row), 'mismatch'
-- (nothing written; repository is the locked row, or NULL when there is no such row).

CREATE FUNCTION migration_fenced_write(
    p_repository_id bigint,
    -- true for a claim: lock the settings row, check enabled and the capacity first
    p_claim boolean,
    -- what the client computed the transition from; the row must still hold these
    p_from_state text,
    p_from_retries integer,
    p_from_aborted_in text,
    -- the writer's fencing token; refused when a newer one wrote the row
    p_token bigint,
    -- the values to write
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
    IF p_claim THEN
        -- Serializes claims (and only claims): the capacity is a hard bound.
        SELECT enabled, capacity INTO v_enabled, v_capacity
            FROM migration_settings WHERE id = 1 FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'migration_settings row missing';
        END IF;
    END IF;
    SELECT * INTO repository FROM container_repositories WHERE id = p_repository_id FOR UPDATE;
    IF NOT FOUND
        OR repository.fencing_token > p_token
        OR repository.migration_state <> p_from_state
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
            THEN now() ELSE migration_skipped_at END
    -- The fence again, as in the locked path: the row is locked, so it always matches.
    WHERE id = p_repository_id AND migration_state = p_from_state AND fencing_token <= p_token
    RETURNING * INTO STRICT repository;
    INSERT INTO migration_events (repository_id, from_state, to_state, event, token, actor,
                                  message_id, detail, accepted)
        VALUES (p_repository_id, p_from_state, p_to_state, p_event, p_token, p_actor,
                p_message_id, p_detail, true);
    outcome := CASE WHEN p_claim THEN 'claimed' ELSE 'stepped' END;
END;
$$;
