-- 010: keyed lanes. A forward pipeline with config `lanes` = N (2..64) is split into N lanes by a key
-- (config `lane_key`, default the message's `key` header). Each lane is its own consumer group: lane 0
-- is the pipeline's consumer group itself, lane i (1..N-1) the group `<group>.lane-<i>-of-<N>`. A lane
-- reads the whole outbox and delivers only the messages of its lane, skipping the others like filtered
-- messages; so the position algorithm of 002 and its proof hold per lane unchanged. (Since 015 the
-- database returns a lane only its own messages; lanes made before keep this rule.)
--
-- Each lane is also its own unit of ownership: the advisory lock (hashtext(relay_group_id),
-- hashtext('<pipeline>#<lane>')) (a one-lane pipeline keeps hashtext('<pipeline>')), and one row of
-- relay_pipeline_state per (pipeline, relay group, lane).

ALTER TABLE tide.relay_pipeline_state ADD COLUMN lane integer NOT NULL DEFAULT 0 CHECK (lane BETWEEN 0 AND 63);
ALTER TABLE tide.relay_pipeline_state DROP CONSTRAINT relay_pipeline_state_pkey;
ALTER TABLE tide.relay_pipeline_state ADD PRIMARY KEY (pipeline, relay_group_id, lane);

-- The number of lanes a pipeline config asks for: 1 unless `lanes` is a whole number from 2 to 64
-- (the relay refuses any other value with a message naming it; this never fails a query).
CREATE FUNCTION tide.pipeline_lanes(p_config jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE WHEN jsonb_typeof(p_config->'lanes') = 'number' AND (p_config->>'lanes') ~ '^[0-9]{1,2}$'
                   AND (p_config->>'lanes')::integer BETWEEN 1 AND 64
              THEN (p_config->>'lanes')::integer ELSE 1 END
$$;

-- The consumer group of lane p_lane of p_lanes: the pipeline's group for lane 0 (and for a one-lane
-- pipeline), `<group>.lane-<i>-of-<n>` otherwise ("." is not allowed in a group name, so no group a
-- user creates can collide with it).
CREATE FUNCTION tide.lane_group(p_group text, p_lane integer, p_lanes integer) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE WHEN p_lane = 0 THEN p_group ELSE p_group || '.lane-' || p_lane || '-of-' || p_lanes END
$$;

-- The lock name of a unit of ownership: the pipeline, or `<pipeline>#<lane>` for a pipeline with lanes
-- ("#" is not allowed in a pipeline name).
CREATE FUNCTION tide.ownership_unit(p_pipeline text, p_lane integer, p_lanes integer) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE WHEN p_lanes <= 1 THEN p_pipeline ELSE p_pipeline || '#' || p_lane END
$$;

-- The lane counts that groups of p_group on p_outbox were created for (empty: the pipeline never ran
-- with lanes).
CREATE FUNCTION tide.lane_counts(p_outbox text, p_group text) RETURNS integer[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT coalesce(array_agg(DISTINCT c.n ORDER BY c.n), '{}')
    FROM (SELECT substring(g.group_name FROM '-of-([0-9]+)$')::integer AS n
            FROM tide.consumer_groups g
           WHERE g.outbox_name = p_outbox AND left(g.group_name, length(p_group) + 6) = p_group || '.lane-') c
$$;

-- Called by the monitoring views (which run functions with the reader's rights) and the relay.
REVOKE EXECUTE ON FUNCTION tide.pipeline_lanes(jsonb), tide.lane_group(text, integer, integer),
                           tide.ownership_unit(text, integer, integer), tide.lane_counts(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tide.pipeline_lanes(jsonb), tide.lane_group(text, integer, integer),
                          tide.ownership_unit(text, integer, integer), tide.lane_counts(text, text)
   TO tide_reader, tide_relay;

-- Creates the groups of lanes 1..p_lanes-1 for a relay group, all at the position of the pipeline's
-- group (lane 0) and in one transaction, while that group's row is locked: no lane can start from a
-- position that lane 0 has already moved past. Idempotent; refuses when groups of another lane count
-- exist (changing `lanes` of a pipeline that ran is refused: its lanes' positions differ).
CREATE FUNCTION tide.consumer_lanes_ensure(p_outbox text, p_group text, p_lanes integer, p_relay_group_id text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_base tide.consumer_groups;
  v_counts integer[];
BEGIN
  PERFORM tide.check_not_null('consumer_lanes_ensure', 'p_outbox', p_outbox);
  PERFORM tide.check_not_null('consumer_lanes_ensure', 'p_group', p_group);
  PERFORM tide.check_not_null('consumer_lanes_ensure', 'p_relay_group_id', p_relay_group_id);
  IF p_lanes IS NULL OR p_lanes < 1 OR p_lanes > 64 THEN
    RAISE EXCEPTION 'lanes must be a whole number from 1 to 64 (got %)', coalesce(p_lanes::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  v_base := tide.consumer_position(p_outbox, p_group, p_relay_group_id); -- locks lane 0's row
  v_counts := tide.lane_counts(p_outbox, p_group);
  IF v_counts <> '{}' AND v_counts <> ARRAY[p_lanes] THEN
    RAISE EXCEPTION 'consumer group "%" on outbox "%" ran with % lanes; changing the number of lanes to % is refused',
      p_group, p_outbox, array_to_string(v_counts, ', '), p_lanes
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'create a new pipeline with a new consumer group (it starts from the place you choose), '
                || 'or delete this pipeline, drop its consumer groups and create it again';
  END IF;
  IF p_lanes = 1 THEN
    RETURN;
  END IF;
  INSERT INTO tide.consumer_groups (outbox_name, group_name, relay_group_id, auto_offset_reset, low, high, cursor_id,
                                    interval_max_id, generation, interval_seq, interval_pending, counted_to, counted_pending)
  SELECT p_outbox, tide.lane_group(p_group, l, p_lanes), p_relay_group_id, v_base.auto_offset_reset, v_base.low, v_base.high,
         v_base.cursor_id, v_base.interval_max_id, v_base.generation, v_base.interval_seq, v_base.interval_pending,
         v_base.counted_to, v_base.counted_pending
    FROM generate_series(1, p_lanes - 1) l
  ON CONFLICT DO NOTHING;
END $$;

REVOKE EXECUTE ON FUNCTION tide.consumer_lanes_ensure(text, text, integer, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tide.consumer_lanes_ensure(text, text, integer, text) TO tide_relay;

-- Changing `lanes` or `lane_key` of a pipeline whose lanes ran would move keys between lanes whose
-- positions differ: messages of a moved key would be skipped or reordered. Refused, whatever path the
-- change takes (relay_set_outbox, an UPDATE).
CREATE FUNCTION tide.relay_pipelines_lanes_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_old_lanes integer := tide.pipeline_lanes(OLD.config);
  v_new_lanes integer := tide.pipeline_lanes(NEW.config);
  v_old_key text := coalesce(OLD.config->>'lane_key', 'headers.key');
  v_new_key text := coalesce(NEW.config->>'lane_key', 'headers.key');
BEGIN
  IF NEW.direction = 'forward' AND (v_old_lanes <> v_new_lanes OR v_old_key <> v_new_key)
     AND tide.lane_counts(OLD.outbox_name, OLD.consumer_group) <> '{}' THEN
    RAISE EXCEPTION 'pipeline "%": changing % of a pipeline whose lanes ran is refused', NEW.name,
      CASE WHEN v_old_lanes <> v_new_lanes THEN format('''lanes'' from %s to %s', v_old_lanes, v_new_lanes)
           ELSE format('''lane_key'' from "%s" to "%s"', v_old_key, v_new_key) END
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'create a new pipeline with a new consumer group (it starts from the place you choose), '
                || 'or delete this pipeline, drop its consumer groups and create it again';
  END IF;
  RETURN NEW;
END $$;

CREATE TRIGGER relay_pipelines_lanes_guard BEFORE UPDATE OF config ON tide.relay_pipelines
  FOR EACH ROW EXECUTE FUNCTION tide.relay_pipelines_lanes_guard();
REVOKE EXECUTE ON FUNCTION tide.relay_pipelines_lanes_guard() FROM PUBLIC;

-- Fencing a frozen owner, per unit of ownership (008 explains why). Ends the session holding the lock
-- of lane p_lane of p_pipeline when that lane's heartbeat is older than p_lease_ms.
CREATE FUNCTION tide.relay_fence_stale_owner(p_pipeline text, p_lane integer, p_relay_group_id text, p_lease_ms integer)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_heartbeat timestamptz;
  v_unit text;
  v_pid integer;
BEGIN
  PERFORM tide.check_not_null('relay_fence_stale_owner', 'p_pipeline', p_pipeline);
  PERFORM tide.check_not_null('relay_fence_stale_owner', 'p_lane', p_lane);
  PERFORM tide.check_not_null('relay_fence_stale_owner', 'p_relay_group_id', p_relay_group_id);
  PERFORM tide.check_not_null('relay_fence_stale_owner', 'p_lease_ms', p_lease_ms);
  IF p_lease_ms < 1000 THEN
    RAISE EXCEPTION 'p_lease_ms must be at least 1000 (got %)', p_lease_ms USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT tide.ownership_unit(p.name, p_lane, tide.pipeline_lanes(p.config)) INTO v_unit
    FROM tide.relay_pipelines p WHERE p.name = p_pipeline;
  IF v_unit IS NULL THEN
    RETURN NULL;
  END IF;
  SELECT coalesce(s.heartbeat_at, s.acquired_at) INTO v_heartbeat FROM tide.relay_pipeline_state s
   WHERE s.pipeline = p_pipeline AND s.relay_group_id = p_relay_group_id AND s.lane = p_lane;
  IF v_heartbeat IS NULL OR v_heartbeat > clock_timestamp() - make_interval(secs => p_lease_ms / 1000.0) THEN
    RETURN NULL;
  END IF;
  SELECT l.pid INTO v_pid FROM pg_locks l
   WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
     AND l.classid::integer = hashtext(p_relay_group_id) AND l.objid::integer = hashtext(v_unit);
  IF v_pid IS NULL OR v_pid = pg_backend_pid() THEN
    RETURN NULL;
  END IF;
  IF NOT pg_terminate_backend(v_pid) THEN
    RETURN NULL;
  END IF;
  RETURN v_pid;
END $$;

REVOKE EXECUTE ON FUNCTION tide.relay_fence_stale_owner(text, integer, text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tide.relay_fence_stale_owner(text, integer, text, integer) TO tide_relay;

-- The three-argument form of 008 fences lane 0 (the whole pipeline when it has one lane).
CREATE OR REPLACE FUNCTION tide.relay_fence_stale_owner(p_pipeline text, p_relay_group_id text, p_lease_ms integer)
RETURNS integer LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT tide.relay_fence_stale_owner(p_pipeline, 0, p_relay_group_id, p_lease_ms)
$$;

-- The groups of lanes 1..N-1 are read by their pipeline: they are not "unread".
CREATE OR REPLACE VIEW tide.unread_consumer_groups AS
SELECT g.outbox_name, g.group_name, g.relay_group_id, l.lag, g.updated_at AS position_moved_at
  FROM tide.consumer_groups g
 CROSS JOIN LATERAL (SELECT tide.consumer_group_lag(g.outbox_name, g.group_name, g.relay_group_id) AS lag) l
 WHERE NOT EXISTS (SELECT 1 FROM tide.relay_pipelines p
                    WHERE p.outbox_name = g.outbox_name
                      AND (p.consumer_group = g.group_name
                           OR left(g.group_name, length(p.consumer_group) + 6) = p.consumer_group || '.lane-'))
   AND l.lag > 0
 ORDER BY g.outbox_name, g.group_name, g.relay_group_id;

-- Per-key poison isolation (config `isolate_poison`). A message whose delivery keeps failing, and the
-- later messages of its key, are parked here, in the transaction that moves the lane's position past
-- them: nothing is lost, and every other key keeps flowing. The relay retries the oldest parked
-- message of each key with backoff; once it is delivered (or dead-lettered after retry.max_attempts)
-- the key's next parked messages follow in order, and the key is released when none is left. A
-- message of a parked key read later is parked behind the others. The message is copied: the outbox
-- row may be removed by the retention sweep once every position is past it.
CREATE TABLE tide.relay_held (
  pipeline           text NOT NULL REFERENCES tide.relay_pipelines (name) ON DELETE CASCADE,
  relay_group_id     text NOT NULL,
  lane               integer NOT NULL DEFAULT 0,
  -- The lane key's text (lane_key; headers.key by default); '' for a message without the key.
  key                text NOT NULL,
  message_id         bigint NOT NULL,
  outbox_name        text NOT NULL,
  topic              text,
  payload            jsonb NOT NULL,
  headers            jsonb NOT NULL DEFAULT '{}',
  message_created_at timestamptz,
  attempts           integer NOT NULL DEFAULT 0,
  error              text,
  held_at            timestamptz NOT NULL DEFAULT now(),
  next_attempt_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (pipeline, relay_group_id, lane, message_id)
);
CREATE INDEX relay_held_key ON tide.relay_held (pipeline, relay_group_id, lane, key, message_id);

-- Parks outbox message p_message_id under p_key (call it in the transaction of the commit that moves
-- the position past it).
CREATE FUNCTION tide.relay_hold(p_pipeline text, p_relay_group_id text, p_lane integer, p_key text, p_message_id bigint,
                                p_error text, p_attempts integer)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_not_null('relay_hold', 'p_pipeline', p_pipeline);
  PERFORM tide.check_not_null('relay_hold', 'p_relay_group_id', p_relay_group_id);
  PERFORM tide.check_not_null('relay_hold', 'p_lane', p_lane);
  PERFORM tide.check_not_null('relay_hold', 'p_key', p_key);
  PERFORM tide.check_not_null('relay_hold', 'p_message_id', p_message_id);
  INSERT INTO tide.relay_held (pipeline, relay_group_id, lane, key, message_id, outbox_name, topic, payload, headers,
                               message_created_at, attempts, error)
  SELECT p_pipeline, p_relay_group_id, p_lane, p_key, m.id, m.outbox, m.topic, m.payload, m.headers, m.created_at,
         coalesce(p_attempts, 0), p_error
    FROM tide.outbox_messages m WHERE m.id = p_message_id
  ON CONFLICT DO NOTHING;
  IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM tide.relay_held h WHERE h.pipeline = p_pipeline
                                  AND h.relay_group_id = p_relay_group_id AND h.lane = p_lane AND h.message_id = p_message_id) THEN
    -- The caller would otherwise move past a message it believes it parked.
    RAISE EXCEPTION 'outbox message % does not exist', p_message_id USING ERRCODE = 'no_data_found';
  END IF;
END $$;

-- A parked message was delivered (p_error NULL: removed), failed again (attempts and error recorded,
-- retried at p_retry_at), or is given up (p_dead: moved to the dead-letter queue).
CREATE FUNCTION tide.relay_held_settle(p_pipeline text, p_relay_group_id text, p_lane integer, p_message_id bigint,
                                       p_error text DEFAULT NULL, p_retry_at timestamptz DEFAULT NULL, p_dead boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_held tide.relay_held;
BEGIN
  PERFORM tide.check_not_null('relay_held_settle', 'p_pipeline', p_pipeline);
  PERFORM tide.check_not_null('relay_held_settle', 'p_relay_group_id', p_relay_group_id);
  PERFORM tide.check_not_null('relay_held_settle', 'p_lane', p_lane);
  PERFORM tide.check_not_null('relay_held_settle', 'p_message_id', p_message_id);
  IF p_error IS NULL THEN
    DELETE FROM tide.relay_held h WHERE h.pipeline = p_pipeline AND h.relay_group_id = p_relay_group_id
       AND h.lane = p_lane AND h.message_id = p_message_id;
  ELSIF p_dead THEN
    DELETE FROM tide.relay_held h WHERE h.pipeline = p_pipeline AND h.relay_group_id = p_relay_group_id
       AND h.lane = p_lane AND h.message_id = p_message_id
    RETURNING * INTO v_held;
    IF FOUND THEN
      INSERT INTO tide.relay_dlq (pipeline, outbox_name, message_id, topic, payload, headers, error, attempts, message_created_at)
      VALUES (v_held.pipeline, v_held.outbox_name, v_held.message_id, v_held.topic, v_held.payload, v_held.headers, p_error,
              v_held.attempts + 1, v_held.message_created_at);
    END IF;
  ELSE
    UPDATE tide.relay_held h SET attempts = h.attempts + 1, error = p_error, next_attempt_at = coalesce(p_retry_at, now())
     WHERE h.pipeline = p_pipeline AND h.relay_group_id = p_relay_group_id AND h.lane = p_lane AND h.message_id = p_message_id;
  END IF;
END $$;

REVOKE EXECUTE ON FUNCTION tide.relay_hold(text, text, integer, text, bigint, text, integer),
                           tide.relay_held_settle(text, text, integer, bigint, text, timestamptz, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tide.relay_hold(text, text, integer, text, bigint, text, integer),
                          tide.relay_held_settle(text, text, integer, bigint, text, timestamptz, boolean) TO tide_relay;
GRANT SELECT ON tide.relay_held TO tide_reader, tide_relay;

-- One row per lane (and relay group): lane, lanes and held (messages parked by isolate_poison) added
-- at the end; consumer_group and lag are those of each lane's group.
CREATE OR REPLACE VIEW tide.pipeline_status AS
SELECT p.name AS pipeline, p.direction, p.enabled, p.plugin_type,
       coalesce(p.outbox_name, p.plugin_type) AS source,
       coalesce(p.inbox_name, p.plugin_type) AS target,
       tide.lane_group(p.consumer_group, l.lane, n.lanes) AS consumer_group,
       s.relay_group_id, s.owner_id, s.heartbeat_at, s.healthy, s.last_error, s.last_error_at,
       s.last_success_at, s.retry_attempt, s.circuit,
       p.config_version, s.config_version AS applied_config_version,
       CASE WHEN p.direction = 'forward' THEN
         tide.consumer_group_lag(p.outbox_name, tide.lane_group(p.consumer_group, l.lane, n.lanes), coalesce(s.relay_group_id, 'default'))
       END AS lag,
       (SELECT count(*) FROM tide.relay_dlq d WHERE d.pipeline = p.name AND d.status IN ('open', 'requeued')) AS dlq_depth,
       l.lane, n.lanes,
       (SELECT count(*) FROM tide.relay_held h
         WHERE h.pipeline = p.name AND h.lane = l.lane AND h.relay_group_id = coalesce(s.relay_group_id, 'default')) AS held
  FROM tide.relay_pipelines p
 CROSS JOIN LATERAL (SELECT CASE p.direction WHEN 'forward' THEN tide.pipeline_lanes(p.config) ELSE 1 END AS lanes) n
 CROSS JOIN LATERAL generate_series(0, n.lanes - 1) AS l(lane)
  LEFT JOIN tide.relay_pipeline_state s ON s.pipeline = p.name AND s.lane = l.lane
 ORDER BY p.name, l.lane, s.relay_group_id;
