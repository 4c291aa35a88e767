-- 005: operations: dropping and rewinding, retention, the forward dead-letter queue, status.

CREATE FUNCTION tide.outbox_drop(p_name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_pipeline text;
BEGIN
  PERFORM tide.check_not_null('outbox_drop', 'p_name', p_name);
  IF NOT EXISTS (SELECT 1 FROM tide.outboxes WHERE name = p_name) THEN
    RAISE EXCEPTION 'outbox "%" does not exist', p_name USING ERRCODE = 'undefined_object';
  END IF;
  SELECT name INTO v_pipeline FROM tide.relay_pipelines WHERE outbox_name = p_name LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'outbox "%" is used by pipeline "%"', p_name, v_pipeline
      USING ERRCODE = 'dependent_objects_still_exist', HINT = 'delete the pipeline first with tide.relay_delete';
  END IF;
  DELETE FROM tide.outbox_messages WHERE outbox = p_name;
  DELETE FROM tide.outboxes WHERE name = p_name; -- consumer groups go with it
END $$;

CREATE FUNCTION tide.drop_consumer_group(p_group text, p_outbox text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_pipeline text;
BEGIN
  PERFORM tide.check_not_null('drop_consumer_group', 'p_group', p_group);
  PERFORM tide.check_not_null('drop_consumer_group', 'p_outbox', p_outbox);
  SELECT name INTO v_pipeline FROM tide.relay_pipelines WHERE outbox_name = p_outbox AND consumer_group = p_group;
  IF FOUND THEN
    RAISE EXCEPTION 'consumer group "%" on outbox "%" is used by pipeline "%"', p_group, p_outbox, v_pipeline
      USING ERRCODE = 'dependent_objects_still_exist';
  END IF;
  DELETE FROM tide.consumer_groups WHERE outbox_name = p_outbox AND group_name = p_group;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'consumer group "%" does not exist on outbox "%"', p_group, p_outbox USING ERRCODE = 'undefined_object';
  END IF;
END $$;

-- Moves a group back so that every message with an id above p_to_id (or created at or after
-- p_to_time) is delivered again, in id order. Guarded: a group whose pipeline is enabled is only
-- rewound with p_force, since its relay may be mid-batch. Returns how many messages will be redelivered.
CREATE FUNCTION tide.consumer_group_rewind(p_group text, p_outbox text, p_to_id bigint DEFAULT NULL,
                                           p_to_time timestamptz DEFAULT NULL, p_force boolean DEFAULT false,
                                           p_relay_group_id text DEFAULT 'default')
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_pipeline text;
  v_high pg_snapshot := pg_current_snapshot();
  v_cursor bigint;
  v_max bigint;
  v_pending bigint;
BEGIN
  PERFORM tide.check_not_null('consumer_group_rewind', 'p_group', p_group);
  PERFORM tide.check_not_null('consumer_group_rewind', 'p_outbox', p_outbox);
  -- A NULL p_force would let an enabled pipeline's group be rewound as if forced (NOT NULL is NULL).
  PERFORM tide.check_not_null('consumer_group_rewind', 'p_force', p_force);
  PERFORM tide.check_not_null('consumer_group_rewind', 'p_relay_group_id', p_relay_group_id);
  IF (p_to_id IS NULL) = (p_to_time IS NULL) THEN
    RAISE EXCEPTION 'consumer group "%": give exactly one of p_to_id and p_to_time', p_group
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM 1 FROM tide.consumer_groups
   WHERE outbox_name = p_outbox AND group_name = p_group AND relay_group_id = p_relay_group_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'consumer group "%" does not exist on outbox "%"', p_group, p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  SELECT name INTO v_pipeline FROM tide.relay_pipelines
   WHERE outbox_name = p_outbox AND consumer_group = p_group AND enabled;
  IF FOUND AND NOT p_force THEN
    RAISE EXCEPTION 'consumer group "%" is in use by enabled pipeline "%"', p_group, v_pipeline
      USING ERRCODE = 'object_in_use',
            HINT = 'disable the pipeline first (tide.relay_disable), or pass p_force := true';
  END IF;
  v_cursor := coalesce(p_to_id,
    (SELECT min(id) - 1 FROM tide.outbox_messages WHERE outbox = p_outbox AND created_at >= p_to_time),
    (SELECT max(id) FROM tide.outbox_messages WHERE outbox = p_outbox), 0);
  SELECT max(m.id) INTO v_max FROM tide.interval_messages(p_outbox, tide.empty_snapshot(), v_high) m;
  SELECT count(*) INTO v_pending FROM tide.outbox_messages
   WHERE outbox = p_outbox AND id > v_cursor AND pg_visible_in_snapshot(txid, v_high);
  -- Everything committed so far becomes one interval whose cursor sits at the rewind point.
  UPDATE tide.consumer_groups
     SET low = tide.empty_snapshot(), high = v_high, cursor_id = v_cursor,
         interval_max_id = coalesce(v_max, v_cursor), committed_offset = v_cursor,
         interval_pending = v_pending, counted_to = NULL, counted_pending = 0,
         generation = generation + 1, updated_at = now()
   WHERE outbox_name = p_outbox AND group_name = p_group AND relay_group_id = p_relay_group_id;
  IF v_pipeline IS NOT NULL THEN
    PERFORM pg_notify('tide_relay_config', v_pipeline);
  END IF;
  RETURN v_pending;
END $$;

-- The arguments every sweep shares. A NULL batch would be LIMIT NULL, no limit at all, and a NULL
-- dry run would delete.
CREATE FUNCTION tide.check_sweep(p_function text, p_batch integer, p_dry_run boolean) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_not_null(p_function, 'p_batch', p_batch);
  PERFORM tide.check_not_null(p_function, 'p_dry_run', p_dry_run);
  IF p_batch < 1 THEN
    RAISE EXCEPTION 'tide.%: p_batch must be at least 1 (got %)', p_function, p_batch USING ERRCODE = 'invalid_parameter_value';
  END IF;
END $$;

-- Deletes at most p_batch messages of one outbox (or of all, outbox by outbox) that are older than the
-- outbox's retention AND delivered by every consumer group, oldest first. Call until it returns less
-- than p_batch. With p_dry_run it only counts what it would delete (unbounded).
--
-- What a call reads does not grow with the table: it walks the (outbox, txid, id) index in txid order
-- from the oldest message, a chunk at a time, and stops at the first message inside the retention or
-- after p_batch deletions, never looking past the oldest position of any group (xmax of its high, or
-- of its low when no interval is open: no message at or after it is delivered by that group). Along
-- the way it passes over only expired messages that some group has not delivered yet (a transaction
-- in progress at a group's position, the rest of an open interval); what a group that never moves
-- holds back lies past that bound. A message is stamped with its transaction's start and txid is
-- assigned at the transaction's first write, so an expired message may come after the first young
-- one in txid order: it is deleted once that one expires, at most a transaction's duration later.
CREATE FUNCTION tide.outbox_retention_sweep(p_outbox text DEFAULT NULL, p_batch integer DEFAULT 10000,
                                            p_dry_run boolean DEFAULT false)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_chunk constant integer := 100;
  v_outbox tide.outboxes;
  v_bound xid8;
  v_after_txid xid8;
  v_after_id bigint;
  v_seen integer;
  v_done boolean;
  v_message record;
  v_ids bigint[];
  v_deleted bigint;
  v_total bigint := 0;
BEGIN
  PERFORM tide.check_sweep('outbox_retention_sweep', p_batch, p_dry_run);
  FOR v_outbox IN SELECT * FROM tide.outboxes WHERE p_outbox IS NULL OR name = p_outbox ORDER BY name LOOP
    SELECT pg_snapshot_xmax(coalesce(g.high, g.low)) INTO v_bound
      FROM tide.consumer_groups g WHERE g.outbox_name = v_outbox.name ORDER BY 1 LIMIT 1;
    IF NOT FOUND THEN
      v_bound := pg_snapshot_xmax(pg_current_snapshot()); -- no group: messages go by age alone
    END IF;
    v_ids := '{}';
    v_after_txid := '0';
    v_after_id := 0;
    v_done := false;
    -- Chunks with a LIMIT, so that the plan is an ordered index range however small the table.
    WHILE NOT v_done LOOP
      v_seen := 0;
      FOR v_message IN
        SELECT m.id, m.txid, m.created_at < now() - make_interval(hours => v_outbox.retention_hours) AS expired,
               NOT EXISTS (SELECT 1 FROM tide.consumer_groups g WHERE g.outbox_name = m.outbox
                            AND NOT tide.is_delivered(m.txid, m.id, g.low, g.high, g.cursor_id)) AS delivered
          FROM tide.outbox_messages m
         WHERE m.outbox = v_outbox.name AND m.txid < v_bound AND (m.txid, m.id) > (v_after_txid, v_after_id)
         ORDER BY m.txid, m.id
         LIMIT v_chunk
      LOOP
        v_seen := v_seen + 1;
        v_after_txid := v_message.txid;
        v_after_id := v_message.id;
        v_done := NOT v_message.expired;
        EXIT WHEN v_done;
        IF v_message.delivered THEN
          v_ids := array_append(v_ids, v_message.id);
          v_done := NOT p_dry_run AND v_total + cardinality(v_ids) >= p_batch;
          EXIT WHEN v_done;
        END IF;
      END LOOP;
      v_done := v_done OR v_seen < v_chunk;
    END LOOP;
    IF p_dry_run THEN
      v_total := v_total + cardinality(v_ids);
    ELSIF cardinality(v_ids) > 0 THEN
      DELETE FROM tide.outbox_messages m WHERE m.id = ANY (v_ids); -- by primary key: no plan reads the outbox
      GET DIAGNOSTICS v_deleted = ROW_COUNT;
      v_total := v_total + v_deleted;
    END IF;
    EXIT WHEN NOT p_dry_run AND v_total >= p_batch;
  END LOOP;
  RETURN v_total;
END $$;

-- Deletes at most p_batch processed rows past processed_retention_hours and dead letters past
-- dlq_retention_hours (0 keeps them) from one inbox or all.
CREATE FUNCTION tide.inbox_retention_sweep(p_inbox text DEFAULT NULL, p_batch integer DEFAULT 10000,
                                           p_dry_run boolean DEFAULT false)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_inbox tide.inboxes;
  v_total bigint := 0;
  v_count bigint;
  v_where text := '(processed_at < now() - make_interval(hours => $1))
                   OR ($2 > 0 AND dead_lettered_at IS NOT NULL AND processed_at IS NULL
                       AND dead_lettered_at < now() - make_interval(hours => $2))';
BEGIN
  PERFORM tide.check_sweep('inbox_retention_sweep', p_batch, p_dry_run);
  FOR v_inbox IN SELECT * FROM tide.inboxes WHERE p_inbox IS NULL OR name = p_inbox ORDER BY name LOOP
    IF p_dry_run THEN
      EXECUTE format('SELECT count(*) FROM tide.%I WHERE %s', v_inbox.table_name, v_where)
        INTO v_count USING v_inbox.processed_retention_hours, v_inbox.dlq_retention_hours;
    ELSE
      EXECUTE format('DELETE FROM tide.%1$I WHERE id IN (SELECT id FROM tide.%1$I WHERE %2$s ORDER BY id LIMIT $3)',
                     v_inbox.table_name, v_where)
        USING v_inbox.processed_retention_hours, v_inbox.dlq_retention_hours, p_batch - v_total;
      GET DIAGNOSTICS v_count = ROW_COUNT;
    END IF;
    v_total := v_total + v_count;
    EXIT WHEN NOT p_dry_run AND v_total >= p_batch;
  END LOOP;
  RETURN v_total;
END $$;

-- The relays' periodic sweep: at most p_batch outbox messages and p_batch inbox rows, one session at
-- a time. A relay calls it every minute and again while it deleted a full batch; while another
-- session is sweeping it returns no row and does nothing, so relays never sweep side by side (they
-- would read and delete the same rows).
CREATE FUNCTION tide.retention_sweep(p_batch integer DEFAULT 5000)
RETURNS TABLE (outbox_deleted bigint, inbox_deleted bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_sweep('retention_sweep', p_batch, false);
  IF NOT pg_try_advisory_xact_lock(7436001003) THEN
    RETURN;
  END IF;
  outbox_deleted := tide.outbox_retention_sweep(NULL, p_batch);
  inbox_deleted := tide.inbox_retention_sweep(NULL, p_batch);
  RETURN NEXT;
END $$;

-- Forward dead letters: messages a sink refused permanently or past their retry budget.
CREATE TABLE tide.relay_dlq (
  id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  pipeline    text NOT NULL,
  outbox_name text NOT NULL,
  message_id  bigint NOT NULL,
  topic       text,
  payload     jsonb NOT NULL,
  headers     jsonb NOT NULL DEFAULT '{}',
  error       text NOT NULL,
  attempts    integer NOT NULL DEFAULT 1,
  status      text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'requeued', 'redelivered', 'resolved')),
  failed_at   timestamptz NOT NULL DEFAULT now(),
  updated_at  timestamptz NOT NULL DEFAULT now(),
  -- The message's own created_at, kept so that a redelivery carries its original time.
  message_created_at timestamptz
);
CREATE INDEX relay_dlq_pipeline_status ON tide.relay_dlq (pipeline, status, id);

CREATE FUNCTION tide.relay_dlq_add(p_pipeline text, p_message_id bigint, p_error text, p_attempts integer DEFAULT 1)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_id bigint;
BEGIN
  PERFORM tide.check_not_null('relay_dlq_add', 'p_pipeline', p_pipeline);
  PERFORM tide.check_not_null('relay_dlq_add', 'p_message_id', p_message_id);
  PERFORM tide.check_not_null('relay_dlq_add', 'p_error', p_error);
  INSERT INTO tide.relay_dlq (pipeline, outbox_name, message_id, topic, payload, headers, error, attempts, message_created_at)
  SELECT p_pipeline, m.outbox, m.id, m.topic, m.payload, m.headers, p_error, coalesce(p_attempts, 1), m.created_at
    FROM tide.outbox_messages m WHERE m.id = p_message_id
  RETURNING id INTO v_id;
  IF v_id IS NULL THEN
    -- The caller would otherwise move past a message it believes it dead-lettered.
    RAISE EXCEPTION 'outbox message % does not exist', p_message_id USING ERRCODE = 'no_data_found';
  END IF;
  RETURN v_id;
END $$;

CREATE FUNCTION tide.relay_dlq_list(p_pipeline text DEFAULT NULL, p_status text DEFAULT 'open')
RETURNS SETOF tide.relay_dlq LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT * FROM tide.relay_dlq
   WHERE (p_pipeline IS NULL OR pipeline = p_pipeline) AND (p_status IS NULL OR status = p_status)
   ORDER BY id;
$$;

-- Asks the owning relay to deliver dead letters again (one entry, or all open ones of a pipeline).
CREATE FUNCTION tide.relay_dlq_requeue(p_id bigint) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_pipeline text;
BEGIN
  PERFORM tide.check_not_null('relay_dlq_requeue', 'p_id', p_id);
  UPDATE tide.relay_dlq SET status = 'requeued', updated_at = now()
   WHERE id = p_id AND status IN ('open', 'resolved') RETURNING pipeline INTO v_pipeline;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'dead letter % does not exist or is already requeued', p_id USING ERRCODE = 'no_data_found';
  END IF;
  PERFORM pg_notify('tide_relay_config', v_pipeline);
  RETURN 1;
END $$;

CREATE FUNCTION tide.relay_dlq_requeue(p_pipeline text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_count integer;
BEGIN
  PERFORM tide.check_not_null('relay_dlq_requeue', 'p_pipeline', p_pipeline);
  IF NOT EXISTS (SELECT 1 FROM tide.relay_pipelines WHERE name = p_pipeline) THEN
    RAISE EXCEPTION 'pipeline "%" does not exist', p_pipeline USING ERRCODE = 'undefined_object';
  END IF;
  UPDATE tide.relay_dlq SET status = 'requeued', updated_at = now() WHERE pipeline = p_pipeline AND status = 'open';
  GET DIAGNOSTICS v_count = ROW_COUNT;
  PERFORM pg_notify('tide_relay_config', p_pipeline);
  RETURN v_count;
END $$;

CREATE FUNCTION tide.relay_dlq_resolve(p_id bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_not_null('relay_dlq_resolve', 'p_id', p_id);
  UPDATE tide.relay_dlq SET status = 'resolved', updated_at = now() WHERE id = p_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'dead letter % does not exist', p_id USING ERRCODE = 'no_data_found';
  END IF;
END $$;

CREATE VIEW tide.pipeline_status AS
SELECT p.name AS pipeline, p.direction, p.enabled, p.plugin_type,
       coalesce(p.outbox_name, p.plugin_type) AS source,
       coalesce(p.inbox_name, p.plugin_type) AS target,
       p.consumer_group, s.relay_group_id, s.owner_id, s.heartbeat_at, s.healthy, s.last_error, s.last_error_at,
       s.last_success_at, s.retry_attempt, s.circuit,
       p.config_version, s.config_version AS applied_config_version,
       CASE WHEN p.direction = 'forward' THEN
         tide.consumer_group_lag(p.outbox_name, p.consumer_group, coalesce(s.relay_group_id, 'default'))
       END AS lag,
       (SELECT count(*) FROM tide.relay_dlq d WHERE d.pipeline = p.name AND d.status IN ('open', 'requeued')) AS dlq_depth
  FROM tide.relay_pipelines p
  LEFT JOIN tide.relay_pipeline_state s ON s.pipeline = p.name
 ORDER BY p.name, s.relay_group_id;

-- Consumer groups no pipeline reads, with messages waiting. Nothing moves their position: unless an
-- application consumes them itself (consumer_next_batch, consumer_commit), they keep every message
-- after it from the retention sweep, forever. Typically the group of a deleted pipeline
-- (relay_delete keeps it, so that a pipeline created again resumes where it stopped); drop it with
-- tide.drop_consumer_group(group_name, outbox_name).
CREATE VIEW tide.unread_consumer_groups AS
SELECT g.outbox_name, g.group_name, g.relay_group_id, l.lag, g.updated_at AS position_moved_at
  FROM tide.consumer_groups g
 CROSS JOIN LATERAL (SELECT tide.consumer_group_lag(g.outbox_name, g.group_name, g.relay_group_id) AS lag) l
 WHERE NOT EXISTS (SELECT 1 FROM tide.relay_pipelines p
                    WHERE p.outbox_name = g.outbox_name AND p.consumer_group = g.group_name)
   AND l.lag > 0
 ORDER BY g.outbox_name, g.group_name, g.relay_group_id;
