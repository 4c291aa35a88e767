-- 015: a lane reads only its own messages. Until now (010) every lane read every message of the
-- outbox and the relay skipped the other lanes' ones, so N lanes read, converted to text and sent the
-- outbox N times. Now the lane is decided in the database while it reads: the read of a lane returns
-- only the messages whose key hashes to the lane, and the position algorithm of 002 is unchanged.
-- Why that cannot skip: a lane's read returns its messages in id order above the cursor; its
-- acknowledgement up to the last of them covers exactly the messages between the cursor and that id
-- (the lane's, all delivered, and the other lanes', not the lane's to deliver); a read that finds no
-- message of the lane left in the open interval closes the interval, as a drained interval always did.
-- (Released migrations are never edited: this changes what 002 and 010 created.)
--
-- The lane of a message: hashtextextended(key, 0) modulo the number of lanes (non-negative), where
-- the key is `headers #>> path` or `payload #>> path` for the pipeline's lane_key (`headers.key` →
-- headers #>> '{key}'), so a string key is its text and any other value PostgreSQL's text of it; a
-- message without the key (missing or JSON null) is in lane 0. hashtextextended is the hash that hash
-- partitioning uses, stable across PostgreSQL versions for that reason.
--
-- Which rule a lane follows is recorded on its consumer group (lane_filter). Lanes created before 015
-- have none: their relay keeps skipping the other lanes' messages itself (FNV-1a of the key, as 010),
-- so a pipeline never changes the lane of a key while it runs. A relay passes the lane it reads
-- (p_lane) with every read, and a group whose filter differs, or a relay older than 015 passing none,
-- is refused: no relay can read a lane under another rule than the one its position was made with.

ALTER TABLE tide.consumer_groups ADD COLUMN lane_filter jsonb
  CHECK (lane_filter IS NULL OR (jsonb_typeof(lane_filter->'lane') = 'number' AND jsonb_typeof(lane_filter->'lanes') = 'number'
                                 AND jsonb_typeof(lane_filter->'key') = 'array'));
COMMENT ON COLUMN tide.consumer_groups.lane_filter IS
  'For a lane read in the database: {"lane": i, "lanes": n, "key": ["headers" | "payload", path...]}; NULL otherwise';

-- The lane filter of lane p_lane of p_lanes for a lane key text like 'headers.key' (the relay builds
-- the same object).
CREATE FUNCTION tide.lane_filter(p_lane integer, p_lanes integer, p_lane_key text) RETURNS jsonb
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT jsonb_build_object('lane', p_lane, 'lanes', p_lanes, 'key', to_jsonb(string_to_array(p_lane_key, '.')))
$$;

-- The lane (0 .. p_lanes-1) of a message with the given headers and payload under a lane filter's
-- key: what the reads below compute inline. For tests and for users asking where a key goes.
CREATE FUNCTION tide.message_lane(p_filter jsonb, p_headers jsonb, p_payload jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT coalesce((hashtextextended(CASE WHEN p_filter->'key'->>0 = 'headers' THEN p_headers ELSE p_payload END
                                    #>> ARRAY(SELECT jsonb_array_elements_text(p_filter->'key') OFFSET 1), 0)
                   % (p_filter->>'lanes')::integer + (p_filter->>'lanes')::integer) % (p_filter->>'lanes')::integer, 0)::integer
$$;

-- Refuses a read under another lane filter than the group's (see the top of this file).
CREATE FUNCTION tide.lane_filter_check(p_group tide.consumer_groups, p_lane jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF p_group.lane_filter IS NULL AND p_lane IS NULL THEN
    RETURN;
  ELSIF p_lane IS NULL THEN
    RAISE EXCEPTION 'consumer group "%" on outbox "%" is lane % of %, read in the database; this reader does not say which lane it reads',
      p_group.group_name, p_group.outbox_name, p_group.lane_filter->>'lane', p_group.lane_filter->>'lanes'
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'a relay older than schema version 15 cannot read lanes created by a newer one: upgrade it';
  ELSIF p_group.lane_filter IS DISTINCT FROM p_lane THEN
    RAISE EXCEPTION 'consumer group "%" on outbox "%" is read as % but its lanes were made as %',
      p_group.group_name, p_group.outbox_name, p_lane::text, coalesce(p_group.lane_filter::text, 'lanes filtered by the relay')
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'changing lanes or lane_key of a pipeline whose lanes ran is refused: create a new pipeline with a new consumer group';
  END IF;
END $$;

-- Creates the lanes' consumer groups like consumer_lanes_ensure (010: all at lane 0's position, in one
-- transaction, refusing another number of lanes) and records on each group, lane 0's included, the
-- lane filter it is read with. Returns true when the lanes are read in the database, false for one
-- lane and for lanes made before 015 (their relay filters them itself, as before). Lanes that ran
-- under another lane key are refused. With one lane, a filter left on the group by lanes whose groups
-- were dropped is cleared.
CREATE FUNCTION tide.consumer_lanes_prepare(p_outbox text, p_group text, p_lanes integer, p_relay_group_id text,
                                            p_lane_key text)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_made integer;
  v_unfiltered integer;
  v_other jsonb;
BEGIN
  PERFORM tide.check_not_null('consumer_lanes_prepare', 'p_lane_key', p_lane_key);
  PERFORM tide.consumer_position(p_outbox, p_group, p_relay_group_id); -- locks lane 0's row
  SELECT count(*), count(*) FILTER (WHERE g.lane_filter IS NULL),
         (array_agg(g.lane_filter) FILTER (WHERE g.lane_filter->'key' IS DISTINCT FROM to_jsonb(string_to_array(p_lane_key, '.'))))[1]
    INTO v_made, v_unfiltered, v_other
    FROM tide.consumer_groups g
   WHERE g.outbox_name = p_outbox AND g.relay_group_id = p_relay_group_id
     AND left(g.group_name, length(p_group) + 6) = p_group || '.lane-';
  PERFORM tide.consumer_lanes_ensure(p_outbox, p_group, p_lanes, p_relay_group_id); -- refuses another lane count
  IF p_lanes = 1 THEN
    UPDATE tide.consumer_groups g SET lane_filter = NULL
     WHERE g.outbox_name = p_outbox AND g.group_name = p_group AND g.relay_group_id = p_relay_group_id
       AND g.lane_filter IS NOT NULL;
    RETURN false;
  END IF;
  IF v_made > 0 AND v_unfiltered > 0 THEN
    RETURN false; -- made before 015: the relay keeps filtering them
  END IF;
  IF v_made > 0 AND v_other IS NOT NULL THEN
    RAISE EXCEPTION 'consumer group "%" on outbox "%": its lanes ran with lane_key "%"; changing it to "%" is refused',
      p_group, p_outbox, (SELECT string_agg(k, '.') FROM jsonb_array_elements_text(v_other->'key') k), p_lane_key
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'create a new pipeline with a new consumer group (it starts from the place you choose), '
                || 'or delete this pipeline, drop its consumer groups and create it again';
  END IF;
  UPDATE tide.consumer_groups g SET lane_filter = tide.lane_filter(l.lane, p_lanes, p_lane_key)
    FROM generate_series(0, p_lanes - 1) AS l(lane)
   WHERE g.outbox_name = p_outbox AND g.relay_group_id = p_relay_group_id
     AND g.group_name = tide.lane_group(p_group, l.lane, p_lanes)
     AND g.lane_filter IS DISTINCT FROM tide.lane_filter(l.lane, p_lanes, p_lane_key);
  RETURN true;
END $$;

REVOKE EXECUTE ON FUNCTION tide.lane_filter(integer, integer, text), tide.message_lane(jsonb, jsonb, jsonb),
                           tide.lane_filter_check(tide.consumer_groups, jsonb),
                           tide.consumer_lanes_prepare(text, text, integer, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tide.lane_filter(integer, integer, text), tide.message_lane(jsonb, jsonb, jsonb),
                          tide.consumer_lanes_prepare(text, text, integer, text, text) TO tide_relay;
GRANT EXECUTE ON FUNCTION tide.message_lane(jsonb, jsonb, jsonb) TO tide_reader;

-- The reads of 002 with the lane: p_lane is the lane filter the caller reads under (NULL for a
-- group without lanes, or with lanes made before 015), checked against the group's; the rows are the
-- lane's only. Otherwise as in 002, whose comments explain them.
DROP FUNCTION tide.consumer_commit_read(text, text, bigint, integer, text, bigint, bigint, bigint, bigint, integer, boolean);
DROP FUNCTION tide.consumer_read_batch(text, text, integer, text, boolean);
DROP FUNCTION tide.consumer_read_ahead(text, text, integer, text, bigint, bigint, bigint);

CREATE FUNCTION tide.consumer_read_batch(p_outbox text, p_group text, p_limit integer DEFAULT 100,
                                         p_relay_group_id text DEFAULT 'default', p_durable boolean DEFAULT true,
                                         p_lane jsonb DEFAULT NULL)
RETURNS TABLE (id bigint, outbox text, topic text, payload jsonb, headers jsonb, created_at timestamptz,
               interval_seq bigint, read_cursor bigint, generation bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  v_group tide.consumer_groups;
  v_high pg_snapshot;
  v_min bigint;
  v_max bigint;
  v_count bigint;
  v_rows bigint;
  v_lanes integer := coalesce((p_lane->>'lanes')::integer, 1);
  v_lane integer := coalesce((p_lane->>'lane')::integer, 0);
  v_in_headers boolean := p_lane->'key'->>0 = 'headers';
  v_path text[] := ARRAY(SELECT jsonb_array_elements_text(p_lane->'key') OFFSET 1);
BEGIN
  IF p_limit IS NULL OR p_limit < 1 THEN
    RAISE EXCEPTION 'batch limit must be at least 1 (got %)', coalesce(p_limit::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM tide.check_not_null('consumer_read_batch', 'p_outbox', p_outbox);
  PERFORM tide.check_not_null('consumer_read_batch', 'p_group', p_group);
  PERFORM tide.check_not_null('consumer_read_batch', 'p_relay_group_id', p_relay_group_id);
  SELECT * INTO v_group FROM tide.consumer_groups g
   WHERE g.outbox_name = p_outbox AND g.group_name = p_group AND g.relay_group_id = p_relay_group_id;
  IF FOUND THEN
    PERFORM tide.lane_filter_check(v_group, p_lane);
  END IF;
  IF FOUND AND v_group.high IS NULL
     AND NOT EXISTS (SELECT 1 FROM tide.interval_messages(p_outbox, v_group.low, pg_current_snapshot())) THEN
    RETURN;
  END IF;
  IF p_durable IS FALSE THEN
    PERFORM set_config('synchronous_commit', 'off', true);
  END IF;
  v_group := tide.consumer_position(p_outbox, p_group, p_relay_group_id);
  PERFORM tide.lane_filter_check(v_group, p_lane);
  FOR attempt IN 1..2 LOOP
    IF v_group.high IS NULL THEN
      v_high := pg_current_snapshot();
      SELECT min(m.id), max(m.id), count(*) INTO v_min, v_max, v_count
        FROM tide.interval_messages(p_outbox, v_group.low, v_high) m;
      IF v_min IS NULL THEN
        UPDATE tide.consumer_groups g SET low = v_high, counted_to = NULL, counted_pending = 0, updated_at = now()
         WHERE g.outbox_name = p_outbox AND g.group_name = p_group AND g.relay_group_id = p_relay_group_id;
        RETURN;
      END IF;
      UPDATE tide.consumer_groups g
         SET high = v_high, cursor_id = v_min - 1, interval_max_id = v_max, interval_seq = g.interval_seq + 1,
             interval_pending = v_count, counted_to = NULL, counted_pending = 0, updated_at = now()
       WHERE g.outbox_name = p_outbox AND g.group_name = p_group AND g.relay_group_id = p_relay_group_id
      RETURNING * INTO v_group;
    END IF;

    -- The lane's messages only (p_lane NULL: all); the lane expression is tide.message_lane inlined.
    RETURN QUERY
      SELECT m.id, m.outbox, m.topic, m.payload, m.headers, m.created_at,
             v_group.interval_seq, v_group.cursor_id, v_group.generation
        FROM tide.outbox_messages m
       WHERE m.outbox = p_outbox
         AND m.id > v_group.cursor_id AND m.id <= v_group.interval_max_id
         AND pg_visible_in_snapshot(m.txid, v_group.high) AND NOT pg_visible_in_snapshot(m.txid, v_group.low)
         AND (p_lane IS NULL
              OR coalesce((hashtextextended(CASE WHEN v_in_headers THEN m.headers ELSE m.payload END #>> v_path, 0)
                           % v_lanes + v_lanes) % v_lanes, 0) = v_lane)
       ORDER BY m.id
       LIMIT p_limit;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    IF v_rows > 0 THEN
      RETURN;
    END IF;
    -- Drained (for a lane: nothing of the lane left in the interval): close it and try the next one.
    -- A lane's position has passed the whole interval: committed_offset says so, as it did when the
    -- lane's acknowledgements covered the other lanes' messages.
    UPDATE tide.consumer_groups g
       SET low = g.high, high = NULL, cursor_id = NULL, interval_max_id = NULL, interval_pending = NULL,
           committed_offset = CASE WHEN p_lane IS NULL THEN g.committed_offset ELSE greatest(g.committed_offset, g.interval_max_id) END,
           updated_at = now()
     WHERE g.outbox_name = p_outbox AND g.group_name = p_group AND g.relay_group_id = p_relay_group_id
    RETURNING * INTO v_group;
  END LOOP;
END $$;

CREATE FUNCTION tide.consumer_read_ahead(p_outbox text, p_group text, p_limit integer, p_relay_group_id text,
                                         p_interval_seq bigint, p_generation bigint, p_after_id bigint,
                                         p_lane jsonb DEFAULT NULL)
RETURNS TABLE (id bigint, outbox text, topic text, payload jsonb, headers jsonb, created_at timestamptz,
               interval_seq bigint, read_cursor bigint, generation bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  v_group tide.consumer_groups;
  v_lanes integer := coalesce((p_lane->>'lanes')::integer, 1);
  v_lane integer := coalesce((p_lane->>'lane')::integer, 0);
  v_in_headers boolean := p_lane->'key'->>0 = 'headers';
  v_path text[] := ARRAY(SELECT jsonb_array_elements_text(p_lane->'key') OFFSET 1);
BEGIN
  IF p_limit IS NULL OR p_limit < 1 THEN
    RAISE EXCEPTION 'batch limit must be at least 1 (got %)', coalesce(p_limit::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM tide.check_not_null('consumer_read_ahead', 'p_outbox', p_outbox);
  PERFORM tide.check_not_null('consumer_read_ahead', 'p_group', p_group);
  PERFORM tide.check_not_null('consumer_read_ahead', 'p_relay_group_id', p_relay_group_id);
  PERFORM tide.check_not_null('consumer_read_ahead', 'p_interval_seq', p_interval_seq);
  PERFORM tide.check_not_null('consumer_read_ahead', 'p_generation', p_generation);
  PERFORM tide.check_not_null('consumer_read_ahead', 'p_after_id', p_after_id);
  SELECT * INTO v_group FROM tide.consumer_groups g
   WHERE g.outbox_name = p_outbox AND g.group_name = p_group AND g.relay_group_id = p_relay_group_id;
  IF NOT FOUND OR v_group.high IS NULL OR v_group.interval_seq <> p_interval_seq
     OR v_group.generation <> p_generation OR p_after_id <= v_group.cursor_id OR p_after_id >= v_group.interval_max_id THEN
    RETURN;
  END IF;
  PERFORM tide.lane_filter_check(v_group, p_lane);
  RETURN QUERY
    SELECT m.id, m.outbox, m.topic, m.payload, m.headers, m.created_at, v_group.interval_seq, p_after_id, v_group.generation
      FROM tide.outbox_messages m
     WHERE m.outbox = p_outbox
       AND m.id > p_after_id AND m.id <= v_group.interval_max_id
       AND pg_visible_in_snapshot(m.txid, v_group.high) AND NOT pg_visible_in_snapshot(m.txid, v_group.low)
       AND (p_lane IS NULL
            OR coalesce((hashtextextended(CASE WHEN v_in_headers THEN m.headers ELSE m.payload END #>> v_path, 0)
                         % v_lanes + v_lanes) % v_lanes, 0) = v_lane)
     ORDER BY m.id
     LIMIT p_limit;
END $$;

CREATE FUNCTION tide.consumer_commit_read(p_outbox text, p_group text, p_last_id bigint, p_count integer,
                                          p_relay_group_id text, p_generation bigint, p_interval_seq bigint,
                                          p_read_cursor bigint, p_owner_epoch bigint, p_limit integer,
                                          p_durable boolean DEFAULT true, p_lane jsonb DEFAULT NULL)
RETURNS TABLE (moved boolean, id bigint, outbox text, topic text, payload jsonb, headers jsonb, created_at timestamptz,
               interval_seq bigint, read_cursor bigint, generation bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF p_limit IS NULL OR p_limit < 1 THEN
    RAISE EXCEPTION 'batch limit must be at least 1 (got %)', coalesce(p_limit::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT tide.consumer_commit(p_outbox, p_group, p_last_id, p_count, p_relay_group_id, p_generation, p_interval_seq,
                              p_read_cursor, p_owner_epoch, p_durable) THEN
    RETURN QUERY SELECT false, NULL::bigint, NULL::text, NULL::text, NULL::jsonb, NULL::jsonb, NULL::timestamptz,
                        NULL::bigint, NULL::bigint, NULL::bigint;
    RETURN;
  END IF;
  RETURN QUERY SELECT true, b.* FROM tide.consumer_read_batch(p_outbox, p_group, p_limit, p_relay_group_id, p_durable, p_lane) b;
  IF NOT FOUND THEN
    RETURN QUERY SELECT true, NULL::bigint, NULL::text, NULL::text, NULL::jsonb, NULL::jsonb, NULL::timestamptz,
                        NULL::bigint, NULL::bigint, NULL::bigint;
  END IF;
END $$;

REVOKE EXECUTE ON FUNCTION tide.consumer_read_batch(text, text, integer, text, boolean, jsonb),
                           tide.consumer_read_ahead(text, text, integer, text, bigint, bigint, bigint, jsonb),
                           tide.consumer_commit_read(text, text, bigint, integer, text, bigint, bigint, bigint, bigint, integer, boolean, jsonb)
  FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tide.consumer_read_batch(text, text, integer, text, boolean, jsonb),
                          tide.consumer_read_ahead(text, text, integer, text, bigint, bigint, bigint, jsonb),
                          tide.consumer_commit_read(text, text, bigint, integer, text, bigint, bigint, bigint, bigint, integer, boolean, jsonb)
  TO tide_relay;

-- relay_wait_applied (013) counted a pipeline's lanes with its own rule, which differed from
-- tide.pipeline_lanes for values the relay refuses (it runs those as one worker that fails to
-- start): one rule now.
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
           CASE WHEN p.direction = 'forward' THEN tide.pipeline_lanes(p.config) ELSE 1 END AS lanes
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
