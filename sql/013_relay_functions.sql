-- 013: every write the relay makes is one named function, plugin types carry the keys their schemas
-- require, status and waiting know about lanes. (Released migrations are never edited: what changed
-- since 012 is here, so an upgraded database ends up like a fresh one.)

-- Relays register every plugin type they load, built-in ones too, with the required keys derived from
-- the plugin's config schema: p_required_keys is what plugin_type_check reads, a list of groups, each a
-- non-empty list of key names of which a config must have at least one, e.g. [["url"], ["subject",
-- "subject_template"]]. The seed of the built-in types (001) states the same keys, for pipelines
-- created before any relay ran; tests/sql/plugin_types.test.ts derives them from the schemas and
-- compares. A drop-in that replaces a built-in type brings its own keys.
DROP FUNCTION tide.register_plugin_type(text, text, jsonb);
CREATE FUNCTION tide.register_plugin_type(p_type text, p_kind text, p_required_keys jsonb)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_bad jsonb;
BEGIN
  PERFORM tide.check_name('plugin type', p_type);
  IF p_kind IS NULL OR p_kind NOT IN ('sink', 'source') THEN
    RAISE EXCEPTION 'plugin type "%": kind must be ''sink'' or ''source'' (got %)', p_type, coalesce(quote_literal(p_kind), 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM tide.check_not_null('register_plugin_type', 'p_required_keys', p_required_keys);
  IF jsonb_typeof(p_required_keys) = 'array' THEN
    SELECT g INTO v_bad FROM jsonb_array_elements(p_required_keys) g
     WHERE CASE WHEN jsonb_typeof(g) = 'array'
                THEN jsonb_array_length(g) = 0 OR EXISTS (SELECT 1 FROM jsonb_array_elements(g) k
                                                           WHERE jsonb_typeof(k) <> 'string' OR k = '""')
                ELSE true END
     LIMIT 1;
  END IF;
  IF jsonb_typeof(p_required_keys) <> 'array' OR v_bad IS NOT NULL THEN
    RAISE EXCEPTION 'plugin type "%": required_keys must be a list of non-empty lists of key names, like [["url"], ["topic", "topic_template"]] (got %)',
      p_type, left(p_required_keys::text, 200) USING ERRCODE = 'invalid_parameter_value';
  END IF;
  INSERT INTO tide.plugin_types (type, kind, required_keys) VALUES (p_type, p_kind, p_required_keys)
  ON CONFLICT (type, kind) DO UPDATE SET required_keys = excluded.required_keys, registered_at = now();
END $$;

-- The two-argument form registers a type keeping the keys the catalog has (none for a new type): what
-- relays of an earlier version call while a rolling upgrade runs, so they cannot clear the keys the
-- schemas gave.
CREATE FUNCTION tide.register_plugin_type(p_type text, p_kind text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.register_plugin_type(p_type, p_kind,
    coalesce((SELECT required_keys FROM tide.plugin_types WHERE type = p_type AND kind = p_kind), '[]'::jsonb));
END $$;

-- Waits until the relays run the pipeline's current config_version, polling the catalog: an enabled
-- pipeline needs a live owner (heartbeat within 30 s) started with that version for each of its lanes
-- (config `lanes`, default 1) and no live owner on an older one; a disabled one needs no live owner.
-- Returns false when p_timeout passes first. Otherwise as in 004.
CREATE OR REPLACE FUNCTION tide.relay_wait_applied(p_name text, p_timeout interval DEFAULT '30 seconds') RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_deadline timestamptz;
  v_pipeline record;
  v_applied boolean;
BEGIN
  PERFORM tide.check_not_null('relay_wait_applied', 'p_name', p_name);
  PERFORM tide.check_not_null('relay_wait_applied', 'p_timeout', p_timeout);
  IF p_timeout < interval '0' THEN
    RAISE EXCEPTION 'tide.relay_wait_applied: p_timeout must not be negative (got %)', p_timeout
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  v_deadline := clock_timestamp() + p_timeout;
  LOOP
    SELECT p.config_version, p.enabled, coalesce(p.xmin = xid(pg_current_xact_id_if_assigned()), false) AS mine,
           CASE WHEN p.direction = 'forward' AND jsonb_typeof(p.config->'lanes') = 'number'
                THEN greatest(1, (p.config->>'lanes')::numeric::int) ELSE 1 END AS lanes
      INTO v_pipeline FROM tide.relay_pipelines p WHERE p.name = p_name;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'pipeline "%" does not exist', p_name USING ERRCODE = 'undefined_object';
    END IF;
    IF v_pipeline.mine THEN
      RAISE EXCEPTION 'pipeline "%": its change is not committed yet, so no relay can apply it', p_name
        USING ERRCODE = 'active_sql_transaction',
              HINT = 'commit first, then call tide.relay_wait_applied in a new transaction (psql -c runs all its statements in one)';
    END IF;
    v_applied := CASE WHEN v_pipeline.enabled THEN
         -- every lane (0 .. lanes-1) runs it: a laned pipeline is applied when its last lane is
         NOT EXISTS (SELECT 1 FROM generate_series(0, v_pipeline.lanes - 1) AS l(lane)
                      WHERE NOT EXISTS (SELECT 1 FROM tide.relay_pipeline_state s
                                         WHERE s.pipeline = p_name AND s.lane = l.lane AND s.owner_id IS NOT NULL
                                           AND s.heartbeat_at > clock_timestamp() - interval '30 seconds'
                                           AND s.config_version = v_pipeline.config_version))
         AND NOT EXISTS (SELECT 1 FROM tide.relay_pipeline_state s
                          WHERE s.pipeline = p_name AND s.owner_id IS NOT NULL AND s.heartbeat_at > clock_timestamp() - interval '30 seconds'
                            AND s.config_version IS DISTINCT FROM v_pipeline.config_version)
       ELSE
         NOT EXISTS (SELECT 1 FROM tide.relay_pipeline_state s
                      WHERE s.pipeline = p_name AND s.owner_id IS NOT NULL AND s.heartbeat_at > clock_timestamp() - interval '30 seconds')
       END;
    IF v_applied THEN
      RETURN true;
    END IF;
    IF clock_timestamp() >= v_deadline THEN
      RETURN false;
    END IF;
    PERFORM pg_sleep(least(0.05, greatest(0, extract(epoch FROM v_deadline - clock_timestamp()))));
  END LOOP;
END $$;

-- The relay's report on the requeued dead letters it delivered once more: the delivered ones are
-- 'redelivered', the failed ones 'open' again with one more attempt. The relay changes dead letters
-- through functions only (relay_dlq_add, this one).
CREATE FUNCTION tide.relay_dlq_redelivered(p_delivered bigint[], p_failed bigint[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  UPDATE tide.relay_dlq SET status = 'redelivered', updated_at = now() WHERE id = ANY (p_delivered);
  UPDATE tide.relay_dlq SET status = 'open', attempts = attempts + 1, updated_at = now() WHERE id = ANY (p_failed);
END $$;

REVOKE UPDATE ON tide.relay_dlq FROM tide_relay;

-- What a relay records about the units it owns, each write one function: the worker of (pipeline,
-- lane) started, running config_version; it could not start; the relay let the unit go; and the
-- heartbeat of every unit it owns. Releases and heartbeats change only the caller's rows (owner_id);
-- the first two take a row over, as the advisory lock, not this table, decides who owns a unit.
CREATE FUNCTION tide.relay_state_acquired(p_pipeline text, p_relay_group_id text, p_lane integer, p_owner_id text, p_config_version bigint)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  INSERT INTO tide.relay_pipeline_state (pipeline, relay_group_id, lane, owner_id, acquired_at, heartbeat_at, healthy, config_version)
  VALUES (p_pipeline, p_relay_group_id, p_lane, p_owner_id, now(), now(), true, p_config_version)
  ON CONFLICT (pipeline, relay_group_id, lane) DO UPDATE
     SET owner_id = excluded.owner_id, acquired_at = now(), heartbeat_at = now(), healthy = true,
         retry_attempt = 0, config_version = excluded.config_version
$$;

CREATE FUNCTION tide.relay_state_start_failed(p_pipeline text, p_relay_group_id text, p_lane integer, p_error text)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  INSERT INTO tide.relay_pipeline_state (pipeline, relay_group_id, lane, owner_id, healthy, last_error, last_error_at)
  VALUES (p_pipeline, p_relay_group_id, p_lane, NULL, false, p_error, now())
  ON CONFLICT (pipeline, relay_group_id, lane) DO UPDATE
     SET owner_id = NULL, healthy = false, last_error = excluded.last_error, last_error_at = now()
$$;

CREATE FUNCTION tide.relay_state_released(p_pipeline text, p_relay_group_id text, p_lane integer, p_owner_id text)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  UPDATE tide.relay_pipeline_state SET owner_id = NULL
   WHERE pipeline = p_pipeline AND lane = p_lane AND relay_group_id = p_relay_group_id AND owner_id = p_owner_id
$$;

-- p_units: one object per owned unit, {pipeline, lane, healthy, last_error, last_error_at,
-- last_success_at, retry_attempt, circuit}; a missing last_success_at keeps the recorded one.
CREATE FUNCTION tide.relay_heartbeat(p_relay_group_id text, p_owner_id text, p_units jsonb)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  UPDATE tide.relay_pipeline_state s
     SET heartbeat_at = now(), healthy = r.healthy, last_error = r.last_error,
         last_error_at = r.last_error_at::timestamptz, retry_attempt = r.retry_attempt, circuit = r.circuit,
         last_success_at = coalesce(r.last_success_at::timestamptz, s.last_success_at)
    FROM jsonb_to_recordset(p_units)
         AS r(pipeline text, lane int, healthy boolean, last_error text, last_error_at text, retry_attempt int, circuit text,
              last_success_at text)
   WHERE s.pipeline = r.pipeline AND s.lane = r.lane AND s.relay_group_id = p_relay_group_id AND s.owner_id = p_owner_id
$$;

REVOKE EXECUTE ON FUNCTION tide.register_plugin_type(text, text, jsonb), tide.register_plugin_type(text, text),
  tide.relay_dlq_redelivered(bigint[], bigint[]),
  tide.relay_state_acquired(text, text, integer, text, bigint), tide.relay_state_start_failed(text, text, integer, text),
  tide.relay_state_released(text, text, integer, text), tide.relay_heartbeat(text, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tide.register_plugin_type(text, text, jsonb), tide.register_plugin_type(text, text),
  tide.relay_dlq_redelivered(bigint[], bigint[]),
  tide.relay_state_acquired(text, text, integer, text, bigint), tide.relay_state_start_failed(text, text, integer, text),
  tide.relay_state_released(text, text, integer, text), tide.relay_heartbeat(text, text, jsonb) TO tide_relay;

-- One row per lane (and relay group), as in 010, and then what `pg-tide status` and /api/v1/pipelines
-- show besides (they read this view): the outbox or inbox, whether the owner's heartbeat is recent
-- (30 s; the lock, not this, decides ownership), the lane group's position, and a reverse pipeline's
-- inbox rows not processed yet.
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
         WHERE h.pipeline = p.name AND h.lane = l.lane AND h.relay_group_id = coalesce(s.relay_group_id, 'default')) AS held,
       p.outbox_name AS outbox, p.inbox_name AS inbox,
       coalesce(s.owner_id IS NOT NULL AND s.heartbeat_at > now() - interval '30 seconds', false) AS owner_alive,
       g.committed_offset, g.delivered_total,
       CASE WHEN EXISTS (SELECT 1 FROM tide.inboxes i WHERE i.name = p.inbox_name)
            THEN (SELECT count(*) FROM tide.inbox_pending(p.inbox_name)) END AS inbox_pending
  FROM tide.relay_pipelines p
 CROSS JOIN LATERAL (SELECT CASE p.direction WHEN 'forward' THEN tide.pipeline_lanes(p.config) ELSE 1 END AS lanes) n
 CROSS JOIN LATERAL generate_series(0, n.lanes - 1) AS l(lane)
  LEFT JOIN tide.relay_pipeline_state s ON s.pipeline = p.name AND s.lane = l.lane
  LEFT JOIN tide.consumer_groups g
    ON g.outbox_name = p.outbox_name AND g.group_name = tide.lane_group(p.consumer_group, l.lane, n.lanes)
   AND g.relay_group_id = coalesce(s.relay_group_id, 'default')
 ORDER BY p.name, l.lane, s.relay_group_id;

-- The relay writes its state through the functions above only.
REVOKE INSERT, UPDATE, DELETE ON tide.relay_pipeline_state FROM tide_relay;
