-- 011: what the operations console and `pg-tide trace` / `pg-tide dlq` ask of the catalog that no
-- other function answers: where one event is, and replaying an inbox's failed messages at once.
-- Neither is SECURITY DEFINER: they read and write only what tide_relay (and the owner) may anyway.

-- Where is my event? p_key is an outbox message id (42), its dedup key (<outbox>:<id>), or an inbox
-- event id. One row per consumer group of the message's outbox (every relay group), and one per
-- inbox holding that event id. Outbox states: delivered, pending, dead-lettered, replay requested
-- (a dead letter requeued, not redelivered yet) or discarded (a dead letter resolved without
-- delivery); a message the retention sweep removed, or never published, is 'not found'. Inbox
-- states: processed, pending, failed (retried later) or dead-lettered.
CREATE FUNCTION tide.trace_event(p_key text)
RETURNS TABLE (kind text, place text, message_id bigint, event_id text, consumer_group text, relay_group_id text,
               pipeline text, state text, attempts integer, detail text, at timestamptz)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_id bigint;
  v_outbox text;
  v_message tide.outbox_messages;
  v_inbox record;
  v_row record;
BEGIN
  PERFORM tide.check_not_null('trace_event', 'p_key', p_key);
  IF p_key ~ '^[0-9]{1,18}$' THEN
    v_id := p_key::bigint;
  ELSIF p_key ~ '^[A-Za-z_][A-Za-z0-9_-]*:[0-9]{1,18}$' THEN
    v_outbox := split_part(p_key, ':', 1);
    v_id := split_part(p_key, ':', 2)::bigint;
    IF NOT EXISTS (SELECT 1 FROM tide.outboxes o WHERE o.name = v_outbox) THEN
      v_id := NULL; -- not a dedup key: maybe an inbox event id of that shape
    END IF;
  END IF;

  IF v_id IS NOT NULL THEN
    SELECT * INTO v_message FROM tide.outbox_messages m WHERE m.id = v_id AND (v_outbox IS NULL OR m.outbox = v_outbox);
    IF v_message.id IS NULL THEN
      RETURN QUERY SELECT 'outbox'::text, v_outbox, v_id, NULL::text, NULL::text, NULL::text, NULL::text, 'not found'::text,
        NULL::integer, 'no outbox message with this id: never published, or removed by the retention sweep'::text,
        NULL::timestamptz;
    ELSE
      RETURN QUERY
        SELECT 'outbox'::text, v_message.outbox, v_message.id, v_message.outbox || ':' || v_message.id, g.group_name,
               g.relay_group_id, p.name,
               CASE WHEN d.status = 'open' THEN 'dead-lettered'
                    WHEN d.status = 'requeued' THEN 'replay requested'
                    WHEN d.status = 'resolved' THEN 'discarded'
                    WHEN d.status = 'redelivered'
                      OR tide.is_delivered(v_message.txid, v_message.id, g.low, g.high, g.cursor_id) THEN 'delivered'
                    ELSE 'pending' END,
               d.attempts,
               CASE WHEN d.status IS NOT NULL THEN d.error END,
               CASE WHEN d.status IS NOT NULL THEN d.updated_at ELSE v_message.created_at END
          FROM tide.consumer_groups g
          LEFT JOIN tide.relay_pipelines p ON p.outbox_name = g.outbox_name AND p.consumer_group = g.group_name
          LEFT JOIN LATERAL (SELECT q.status, q.attempts, q.error, q.updated_at FROM tide.relay_dlq q
                              WHERE q.pipeline = p.name AND q.message_id = v_message.id
                              ORDER BY q.id DESC LIMIT 1) d ON true
         WHERE g.outbox_name = v_message.outbox
         ORDER BY g.group_name, g.relay_group_id;
    END IF;
  END IF;

  FOR v_inbox IN SELECT i.name, i.table_name, i.max_retries FROM tide.inboxes i ORDER BY i.name LOOP
    EXECUTE format('SELECT m.id, m.event_id, m.processed_at, m.retry_count, m.last_error, m.dead_lettered_at,
                           m.received_at
                      FROM tide.%I m WHERE m.event_id = tide.inbox_event_id($1)', v_inbox.table_name)
      INTO v_row USING p_key;
    IF v_row.id IS NOT NULL THEN
      RETURN QUERY SELECT 'inbox'::text, v_inbox.name::text, v_row.id::bigint, v_row.event_id::text, NULL::text, NULL::text,
        (SELECT p.name FROM tide.relay_pipelines p WHERE p.inbox_name = v_inbox.name ORDER BY p.name LIMIT 1),
        CASE WHEN v_row.processed_at IS NOT NULL THEN 'processed'
             WHEN v_row.dead_lettered_at IS NOT NULL OR v_row.retry_count >= v_inbox.max_retries THEN 'dead-lettered'
             WHEN v_row.retry_count > 0 THEN 'failed'
             ELSE 'pending' END,
        v_row.retry_count::integer, v_row.last_error::text,
        coalesce(v_row.processed_at, v_row.dead_lettered_at, v_row.received_at)::timestamptz;
    END IF;
    v_row := NULL;
  END LOOP;
END $$;

-- Gives every failed or dead-lettered, unprocessed message of an inbox another round of attempts
-- (what replay_inbox_messages does for named events). Returns how many.
CREATE FUNCTION tide.inbox_replay_failed(p_name text) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_count integer;
BEGIN
  PERFORM tide.check_not_null('inbox_replay_failed', 'p_name', p_name);
  EXECUTE format(
    'UPDATE tide.%I SET retry_count = 0, last_error = NULL, dead_lettered_at = NULL, claim_id = NULL, visible_at = NULL
      WHERE processed_at IS NULL AND (retry_count > 0 OR dead_lettered_at IS NOT NULL)', tide.inbox_table(p_name));
  GET DIAGNOSTICS v_count = ROW_COUNT;
  RETURN v_count;
END $$;

REVOKE EXECUTE ON FUNCTION tide.trace_event(text), tide.inbox_replay_failed(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tide.trace_event(text), tide.inbox_replay_failed(text) TO tide_relay;
