-- 014: a WAL capture's slot limit acts (warn, pause or drop, on_lag_limit), and its state is shown.
-- (Released migrations are never edited: this changes what 012 created.)

-- The slot's limit: the relay warns when its unconfirmed WAL exceeds lag_warn_bytes, and then does
-- what on_lag_limit says (tide.wal_capture_apply_limit). 'warn': only warn. 'pause': relays stop
-- reading the slot (the server keeps its WAL, nothing is lost) until tide.wal_capture_resume. 'drop':
-- the slot is dropped (its WAL freed, changes made from then on are not captured) and the capture
-- stays, marked dropped, until uncapture_table. state is 'capturing', or 'paused' / 'dropped' by the
-- limit's action; state_reason and state_at say why and when.
ALTER TABLE tide.wal_captures
  ADD COLUMN on_lag_limit text NOT NULL DEFAULT 'warn' CHECK (on_lag_limit IN ('warn', 'pause', 'drop')),
  ADD COLUMN state text NOT NULL DEFAULT 'capturing' CHECK (state IN ('capturing', 'paused', 'dropped')),
  ADD COLUMN state_reason text,
  ADD COLUMN state_at timestamptz;

-- Drops a slot now, ending the replication session that streams it first. No checks: for
-- wal_slot_drop and wal_capture_apply_limit only (executable by nobody else).
CREATE FUNCTION tide.wal_slot_drop_now(p_slot text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_pid integer;
  v_deadline timestamptz := clock_timestamp() + interval '10 seconds';
BEGIN
  LOOP
    SELECT active_pid INTO v_pid FROM pg_replication_slots WHERE slot_name = p_slot AND database = current_database();
    IF NOT FOUND THEN
      RETURN;
    END IF;
    IF v_pid IS NULL THEN
      BEGIN
        PERFORM pg_drop_replication_slot(p_slot);
        RETURN;
      EXCEPTION WHEN object_in_use OR undefined_object THEN
        NULL; -- a relay took it up again, or it is gone: look again
      END;
    ELSE
      PERFORM pg_terminate_backend(v_pid);
    END IF;
    IF clock_timestamp() > v_deadline THEN
      RAISE EXCEPTION 'replication slot % is still in use by process %', p_slot, v_pid USING ERRCODE = 'object_in_use';
    END IF;
    PERFORM pg_sleep(0.05);
  END LOOP;
END $$;

-- As in 012, dropping through wal_slot_drop_now.
CREATE OR REPLACE FUNCTION tide.wal_slot_drop(p_slot text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF p_slot IS NULL OR p_slot !~ '^tide_wal_[a-z0-9_]+$' THEN
    RAISE EXCEPTION 'wal_slot_drop: "%" is not a tide slot name', p_slot USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF EXISTS (SELECT 1 FROM tide.wal_captures WHERE slot_name = p_slot) THEN
    RAISE EXCEPTION 'replication slot % belongs to a capture; use tide.uncapture_table', p_slot USING ERRCODE = 'object_in_use';
  END IF;
  -- The slot of a table that still exists may be dropped only by its owner (session_user: the caller).
  IF EXISTS (SELECT 1 FROM pg_class c
              WHERE c.oid = substring(p_slot FROM '_([0-9]+)_[0-9a-f]{8}$')::oid
                AND NOT pg_has_role(session_user, c.relowner, 'MEMBER')) THEN
    RAISE EXCEPTION 'replication slot %: only the captured table''s owner can drop it (you are %)', p_slot, session_user
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  PERFORM tide.wal_slot_drop_now(p_slot);
END $$;

-- One row per WAL capture: its slot's health. lag_bytes: WAL written since the position the relay
-- last confirmed (what the slot keeps the server from recycling, at most); confirmed_age: since the
-- relay last confirmed; over_limit: lag_bytes above lag_warn_bytes. state: 'dropped' or 'paused' (by
-- the limit's action, see state_reason and state_at), else 'missing' (the slot is gone: dropped by
-- hand), 'lost' (PostgreSQL invalidated it: max_slot_wal_keep_size), 'over limit', 'streaming' (a
-- relay reads it) or 'not read'.
CREATE OR REPLACE VIEW tide.wal_capture_status AS
SELECT w.table_oid::regclass::text AS table_name, w.outbox_name, w.slot_name, w.operations,
       s.slot_name IS NOT NULL AS slot_exists, coalesce(s.active, false) AS active, s.active_pid,
       s.confirmed_flush_lsn,
       CASE WHEN s.slot_name IS NOT NULL THEN greatest(0, pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn))::bigint END AS lag_bytes,
       CASE WHEN s.slot_name IS NOT NULL THEN greatest(0, pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn))::bigint END AS retained_bytes,
       s.wal_status, now() - coalesce(w.confirmed_at, w.created_at) AS confirmed_age, w.lag_warn_bytes,
       coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn) > w.lag_warn_bytes, false) AS over_limit,
       w.on_lag_limit,
       CASE WHEN w.state <> 'capturing' THEN w.state
            WHEN s.slot_name IS NULL THEN 'missing'
            WHEN s.wal_status = 'lost' THEN 'lost'
            WHEN pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn) > w.lag_warn_bytes THEN 'over limit'
            WHEN s.active THEN 'streaming'
            ELSE 'not read' END AS state,
       w.state_reason, w.state_at
  FROM tide.wal_captures w
  LEFT JOIN pg_replication_slots s ON s.slot_name = w.slot_name AND s.database = current_database();

-- What the relay calls when it sees a capture's slot over its limit: checks the lag again here (a
-- relay cannot pause or drop a slot that is within its limit) and applies the capture's
-- on_lag_limit. 'pause' and 'drop' record the state with the reason and time; 'drop' then drops the
-- slot, ending the replication session that reads it. Returns what was done: 'warn', 'pause',
-- 'drop', or NULL (within the limit, already paused or dropped, or no such capture).
CREATE FUNCTION tide.wal_capture_apply_limit(p_slot text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_capture tide.wal_captures;
  v_lag bigint;
BEGIN
  SELECT * INTO v_capture FROM tide.wal_captures WHERE slot_name = p_slot AND state = 'capturing' FOR UPDATE;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint INTO v_lag
    FROM pg_replication_slots WHERE slot_name = p_slot AND database = current_database();
  IF v_lag IS NULL OR v_lag <= v_capture.lag_warn_bytes THEN
    RETURN NULL;
  END IF;
  IF v_capture.on_lag_limit = 'warn' THEN
    RETURN 'warn';
  END IF;
  UPDATE tide.wal_captures
     SET state = CASE v_capture.on_lag_limit WHEN 'pause' THEN 'paused' ELSE 'dropped' END, state_at = now(),
         state_reason = format('slot lag %s bytes passed the limit of %s bytes', v_lag, v_capture.lag_warn_bytes)
   WHERE slot_name = p_slot;
  IF v_capture.on_lag_limit = 'drop' THEN
    PERFORM tide.wal_slot_drop_now(p_slot); -- last: it cannot be rolled back
  END IF;
  RETURN v_capture.on_lag_limit;
END $$;

-- Lets relays read a capture that its limit paused again. Refused while the slot is still over the
-- limit (the relay would pause it again at once): raise the limit first. The caller must own the table.
CREATE FUNCTION tide.wal_capture_resume(p_table regclass, p_outbox text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_status record;
BEGIN
  PERFORM tide.check_not_null('wal_capture_resume', 'p_table', p_table);
  PERFORM tide.check_not_null('wal_capture_resume', 'p_outbox', p_outbox);
  PERFORM tide.check_table_owner(p_table, 'resume its capture');
  SELECT w.state, w.lag_warn_bytes, pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint AS lag_bytes INTO v_status
    FROM tide.wal_captures w
    LEFT JOIN pg_replication_slots s ON s.slot_name = w.slot_name AND s.database = current_database()
   WHERE w.table_oid = p_table AND w.outbox_name = p_outbox FOR UPDATE OF w;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'table % is not captured from the WAL into outbox "%"', p_table, p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  IF v_status.state = 'dropped' THEN
    RAISE EXCEPTION 'capture of % into outbox "%": its slot was dropped, changes since are lost to it', p_table, p_outbox
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'capture it again: tide.uncapture_table, tide.capture_table(..., p_mode => ''wal''), then CALL tide.capture_backfill(..., p_restart => true)';
  END IF;
  IF v_status.state <> 'paused' THEN
    RETURN;
  END IF;
  IF v_status.lag_bytes > v_status.lag_warn_bytes THEN
    RAISE EXCEPTION 'capture of % into outbox "%": the slot lag (% bytes) is still over its limit (% bytes)', p_table, p_outbox,
      v_status.lag_bytes, v_status.lag_warn_bytes
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'raise the limit with tide.wal_capture_set_limit first, or the relay pauses it again';
  END IF;
  UPDATE tide.wal_captures SET state = 'capturing', state_reason = NULL, state_at = now()
   WHERE table_oid = p_table AND outbox_name = p_outbox;
END $$;

DROP FUNCTION tide.wal_capture_set_limit(regclass, text, bigint);
-- Sets a capture's slot limit: the lag at which the relay warns, and what it does then
-- (p_on_lag_limit 'warn', 'pause' or 'drop'; NULL keeps the current one). The caller must own the table.
CREATE FUNCTION tide.wal_capture_set_limit(p_table regclass, p_outbox text, p_lag_warn_bytes bigint,
                                           p_on_lag_limit text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_not_null('wal_capture_set_limit', 'p_table', p_table);
  PERFORM tide.check_not_null('wal_capture_set_limit', 'p_outbox', p_outbox);
  IF p_lag_warn_bytes IS NULL OR p_lag_warn_bytes < 1 THEN
    RAISE EXCEPTION 'wal_capture_set_limit: p_lag_warn_bytes must be at least 1 (got %)', coalesce(p_lag_warn_bytes::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_on_lag_limit NOT IN ('warn', 'pause', 'drop') THEN
    RAISE EXCEPTION 'wal_capture_set_limit: p_on_lag_limit must be ''warn'', ''pause'' or ''drop'' (got "%")', p_on_lag_limit
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM tide.check_table_owner(p_table, 'configure its capture');
  UPDATE tide.wal_captures SET lag_warn_bytes = p_lag_warn_bytes, on_lag_limit = coalesce(p_on_lag_limit, on_lag_limit)
   WHERE table_oid = p_table AND outbox_name = p_outbox;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'table % is not captured from the WAL into outbox "%"', p_table, p_outbox USING ERRCODE = 'undefined_object';
  END IF;
END $$;

REVOKE EXECUTE ON FUNCTION tide.wal_slot_drop_now(text), tide.wal_capture_set_limit(regclass, text, bigint, text),
  tide.wal_capture_apply_limit(text), tide.wal_capture_resume(regclass, text) FROM PUBLIC;
GRANT UPDATE (on_lag_limit, state, state_reason, state_at) ON tide.wal_captures TO tide_publisher, tide_relay;
GRANT EXECUTE ON FUNCTION tide.wal_capture_set_limit(regclass, text, bigint, text), tide.wal_capture_resume(regclass, text)
  TO tide_publisher, tide_relay;
GRANT EXECUTE ON FUNCTION tide.wal_capture_apply_limit(text) TO tide_relay;
