-- 008: fencing a frozen owner.
--
-- A relay owns a pipeline through a session advisory lock, (hashtext(relay_group_id),
-- hashtext(pipeline)), held on a connection of its own, and refreshes relay_pipeline_state.heartbeat_at
-- while it is alive. A process that is frozen (SIGSTOP, a VM pause, a long GC) keeps its session and
-- so its locks, and would keep its pipelines forever. Another relay that finds the heartbeat older than
-- its lease ends that session; PostgreSQL then drops the lock and the next reconcile takes the
-- pipeline. When the frozen process resumes, its acknowledgements are refused by consumer_commit's
-- compare-and-set and it notices on its next ownership check that its session is gone.

-- Ends the session holding pipeline p_pipeline's lock when its heartbeat is older than p_lease_ms.
-- Returns the process id it terminated, or NULL when the owner is alive (or there is none).
-- SECURITY DEFINER so that relays need no right to signal other sessions: it can only end a session
-- that holds this pipeline's tide lock, and only when that owner's heartbeat is stale. The schema
-- owner must be allowed to signal the relays' sessions: a superuser, or a member of pg_signal_backend.
CREATE FUNCTION tide.relay_fence_stale_owner(p_pipeline text, p_relay_group_id text, p_lease_ms integer)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_heartbeat timestamptz;
  v_pid integer;
BEGIN
  PERFORM tide.check_not_null('relay_fence_stale_owner', 'p_pipeline', p_pipeline);
  PERFORM tide.check_not_null('relay_fence_stale_owner', 'p_relay_group_id', p_relay_group_id);
  PERFORM tide.check_not_null('relay_fence_stale_owner', 'p_lease_ms', p_lease_ms);
  IF p_lease_ms < 1000 THEN
    RAISE EXCEPTION 'p_lease_ms must be at least 1000 (got %)', p_lease_ms USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT coalesce(s.heartbeat_at, s.acquired_at) INTO v_heartbeat FROM tide.relay_pipeline_state s
   WHERE s.pipeline = p_pipeline AND s.relay_group_id = p_relay_group_id;
  IF v_heartbeat IS NULL OR v_heartbeat > clock_timestamp() - make_interval(secs => p_lease_ms / 1000.0) THEN
    RETURN NULL;
  END IF;
  SELECT l.pid INTO v_pid FROM pg_locks l
   WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
     AND l.classid::integer = hashtext(p_relay_group_id) AND l.objid::integer = hashtext(p_pipeline);
  IF v_pid IS NULL OR v_pid = pg_backend_pid() THEN
    RETURN NULL;
  END IF;
  IF NOT pg_terminate_backend(v_pid) THEN
    RETURN NULL;
  END IF;
  RETURN v_pid;
END $$;

REVOKE EXECUTE ON FUNCTION tide.relay_fence_stale_owner(text, text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tide.relay_fence_stale_owner(text, text, integer) TO tide_relay;
