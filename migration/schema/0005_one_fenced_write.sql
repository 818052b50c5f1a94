-- registry-migrator schema 0005: the one fenced-write engine.
--
-- Until 0004 a fenced write had two paths: schema 0002's function, and a Python locked
-- transaction that decided whenever the function answered 'mismatch' (a refusal among
-- them) and that recorded the refused writes. This version makes the function the only
-- path: it does the fence check, records a refused write itself (a migration_events row
-- with accepted = false, detail.reason saying why), the capacity check under the
-- settings-row lock for claims, the write and its event. The Python store only computes
-- the transition (migration/states.py is the one state machine) and calls it.
--
-- The client computes the transition from a row it read without a lock (or one it was
-- given) and passes the values it computed FROM (state, retries count, aborted-in state)
-- and the values to write. Under the row lock, in this order:
--   1. no such row: 'not_found';
--   2. a newer token wrote the row: 'stale_token', recorded;
--      the row is in another state than p_from_state: 'state_changed', recorded;
--   3. the retries count or aborted-in state differ (the row moved and came back between
--      the client's read and this call): 'mismatch', nothing written or recorded; the
--      client reads again and recomputes;
--   4. claims: 'disabled', 'at_capacity' (nothing written);
--   5. the write and its accepted event: 'claimed' / 'stepped'.
-- p_to_state NULL asks for the refusal only (the client's read already showed the write
-- fenced out): when the locked row is no longer fenced out, 'mismatch'. Such a call does
-- not take the settings lock: a refusal changes no count.
--
-- VOLATILE plpgsql: under READ COMMITTED every statement inside takes a fresh snapshot,
-- so the count of active repositories, made after the settings lock is granted, sees
-- every claim committed before it (a single SQL statement would count with the snapshot
-- taken before waiting for the lock, and could pass the capacity).
--
-- Lock order: settings row, then repository row (as before; no deadlock between claims).
-- The repository is returned in every outcome but 'not_found' (the locked row, or the
-- row after the write).

DROP FUNCTION migration_fenced_write(bigint, boolean, text, integer, text, bigint, text,
    integer, text, text, text, text, text, text, jsonb);

CREATE FUNCTION migration_fenced_write(
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
            THEN now() ELSE migration_skipped_at END
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
