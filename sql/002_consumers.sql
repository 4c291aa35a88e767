-- 002: consumer groups and the snapshot-based reader.
--
-- A position is not "last id seen": ids are allocated at insert but become visible at commit, so an
-- id watermark skips a lower id that commits late. A position is a snapshot `low`: every message whose
-- transaction is visible in `low` has been delivered. While an interval is open, `high` is the snapshot
-- bounding it and `cursor_id` the last id delivered inside it; the interval holds exactly the messages
-- visible in `high` and not in `low`, delivered in id order. An open transaction holds back only its
-- own messages (they belong to a later interval) and nobody waits on anybody.

CREATE TABLE tide.consumer_groups (
  outbox_name       text NOT NULL REFERENCES tide.outboxes (name) ON DELETE CASCADE,
  group_name        text NOT NULL,
  -- Relays with different relay_group_ids keep independent positions in the same group.
  relay_group_id    text NOT NULL DEFAULT 'default',
  auto_offset_reset text NOT NULL DEFAULT 'earliest' CHECK (auto_offset_reset IN ('earliest', 'latest')),
  consumer_id       text NOT NULL DEFAULT 'relay-0',
  low               pg_snapshot NOT NULL,
  high              pg_snapshot,
  cursor_id         bigint,
  interval_max_id   bigint,
  committed_offset  bigint NOT NULL DEFAULT 0,
  delivered_total   bigint NOT NULL DEFAULT 0,
  -- Bumped by every rewind: an acknowledgement for a batch read before it is stale and ignored.
  generation        bigint NOT NULL DEFAULT 0,
  -- Bumped each time an interval opens: with cursor_id it identifies the point a batch was read
  -- from, so that an acknowledgement can be checked against it (see consumer_commit).
  interval_seq      bigint NOT NULL DEFAULT 0,
  -- Bumped each time a relay takes the pipeline over (consumer_claim): an acknowledgement carrying an
  -- older epoch comes from a former owner and is refused.
  owner_epoch       bigint NOT NULL DEFAULT 0,
  created_at        timestamptz NOT NULL DEFAULT now(),
  updated_at        timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (outbox_name, group_name, relay_group_id)
);

-- A snapshot in which no transaction is visible: the start of an 'earliest' group.
CREATE FUNCTION tide.empty_snapshot() RETURNS pg_snapshot
LANGUAGE sql IMMUTABLE AS $$ SELECT '3:3:'::pg_snapshot $$;

CREATE FUNCTION tide.create_consumer_group(p_group text, p_outbox text, p_auto_offset_reset text DEFAULT 'earliest')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_name('consumer group', p_group);
  PERFORM tide.check_not_null('create_consumer_group', 'p_outbox', p_outbox);
  IF NOT EXISTS (SELECT 1 FROM tide.outboxes WHERE name = p_outbox) THEN
    RAISE EXCEPTION 'outbox "%" does not exist', p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  IF p_auto_offset_reset IS NULL OR p_auto_offset_reset NOT IN ('earliest', 'latest') THEN
    RAISE EXCEPTION 'consumer group "%": auto_offset_reset must be ''earliest'' or ''latest'' (got %)',
      p_group, coalesce(quote_literal(p_auto_offset_reset), 'NULL') USING ERRCODE = 'invalid_parameter_value';
  END IF;
  INSERT INTO tide.consumer_groups (outbox_name, group_name, auto_offset_reset, low)
  VALUES (p_outbox, p_group, p_auto_offset_reset,
          CASE p_auto_offset_reset WHEN 'latest' THEN pg_current_snapshot() ELSE tide.empty_snapshot() END);
EXCEPTION WHEN unique_violation THEN
  RAISE EXCEPTION 'consumer group "%" already exists on outbox "%"', p_group, p_outbox USING ERRCODE = 'duplicate_object';
END $$;

-- Messages of an outbox visible in snapshot p_high and not in p_low. Only transactions at or above
-- xmax(low), or in progress at low, can qualify, which keeps the index range small.
CREATE FUNCTION tide.interval_messages(p_outbox text, p_low pg_snapshot, p_high pg_snapshot)
RETURNS SETOF tide.outbox_messages LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT m.* FROM tide.outbox_messages m
   WHERE m.outbox = p_outbox
     AND m.txid >= pg_snapshot_xmax(p_low) AND m.txid < pg_snapshot_xmax(p_high)
     AND pg_visible_in_snapshot(m.txid, p_high) AND NOT pg_visible_in_snapshot(m.txid, p_low)
  UNION ALL
  SELECT m.* FROM tide.outbox_messages m
   WHERE m.outbox = p_outbox
     AND m.txid = ANY (ARRAY(SELECT pg_snapshot_xip(p_low)))
     AND pg_visible_in_snapshot(m.txid, p_high)
$$;

-- The group row for a relay group, created from the group's definition the first time a relay group
-- other than 'default' reads it.
CREATE FUNCTION tide.consumer_position(p_outbox text, p_group text, p_relay_group_id text)
RETURNS tide.consumer_groups LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_group tide.consumer_groups;
BEGIN
  PERFORM tide.check_not_null('consumer_position', 'p_outbox', p_outbox);
  PERFORM tide.check_not_null('consumer_position', 'p_group', p_group);
  PERFORM tide.check_not_null('consumer_position', 'p_relay_group_id', p_relay_group_id);
  SELECT * INTO v_group FROM tide.consumer_groups
   WHERE outbox_name = p_outbox AND group_name = p_group AND relay_group_id = p_relay_group_id FOR UPDATE;
  IF FOUND THEN
    RETURN v_group;
  END IF;
  SELECT * INTO v_group FROM tide.consumer_groups
   WHERE outbox_name = p_outbox AND group_name = p_group AND relay_group_id = 'default';
  IF NOT FOUND THEN
    RAISE EXCEPTION 'consumer group "%" does not exist on outbox "%"', p_group, p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  INSERT INTO tide.consumer_groups (outbox_name, group_name, relay_group_id, auto_offset_reset, low)
  VALUES (p_outbox, p_group, p_relay_group_id, v_group.auto_offset_reset,
          CASE v_group.auto_offset_reset WHEN 'latest' THEN pg_current_snapshot() ELSE tide.empty_snapshot() END)
  ON CONFLICT DO NOTHING;
  SELECT * INTO v_group FROM tide.consumer_groups
   WHERE outbox_name = p_outbox AND group_name = p_group AND relay_group_id = p_relay_group_id FOR UPDATE;
  RETURN v_group;
END $$;

-- A relay that takes a group over (it holds the pipeline's lock) claims it: the owner epoch moves on,
-- and every acknowledgement of a former owner, however late, is refused from now on. Returns the new
-- epoch, which the new owner passes to consumer_commit.
CREATE FUNCTION tide.consumer_claim(p_outbox text, p_group text, p_relay_group_id text DEFAULT 'default')
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_epoch bigint;
BEGIN
  PERFORM tide.check_not_null('consumer_claim', 'p_outbox', p_outbox);
  PERFORM tide.check_not_null('consumer_claim', 'p_group', p_group);
  PERFORM tide.check_not_null('consumer_claim', 'p_relay_group_id', p_relay_group_id);
  PERFORM tide.consumer_position(p_outbox, p_group, p_relay_group_id);
  UPDATE tide.consumer_groups g SET owner_epoch = g.owner_epoch + 1
   WHERE g.outbox_name = p_outbox AND g.group_name = p_group AND g.relay_group_id = p_relay_group_id
  RETURNING g.owner_epoch INTO v_epoch;
  RETURN v_epoch;
END $$;

-- The next batch for a group, in id order, with the fence it was read under: the interval
-- (interval_seq), the cursor the batch starts after (read_cursor) and the rewind generation.
-- Opens an interval when none is open; when the open one is drained, moves low up to high and
-- opens the next. Does not acknowledge anything: a caller that crashes before consumer_commit gets
-- the same messages again.
--
-- An idle group costs no write: when no interval is open, a plain read first looks for a message
-- committed since low; only when there is one is the row locked and the interval opened. Neither
-- pg_current_snapshot() nor a plain SELECT assigns a transaction id.
CREATE FUNCTION tide.consumer_read_batch(p_outbox text, p_group text, p_limit integer DEFAULT 100,
                                         p_relay_group_id text DEFAULT 'default')
RETURNS TABLE (id bigint, outbox text, topic text, payload jsonb, headers jsonb, created_at timestamptz,
               interval_seq bigint, read_cursor bigint, generation bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  v_group tide.consumer_groups;
  v_high pg_snapshot;
  v_min bigint;
  v_max bigint;
  v_rows bigint;
BEGIN
  IF p_limit IS NULL OR p_limit < 1 THEN
    RAISE EXCEPTION 'batch limit must be at least 1 (got %)', coalesce(p_limit::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM tide.check_not_null('consumer_read_batch', 'p_outbox', p_outbox);
  PERFORM tide.check_not_null('consumer_read_batch', 'p_group', p_group);
  PERFORM tide.check_not_null('consumer_read_batch', 'p_relay_group_id', p_relay_group_id);
  SELECT * INTO v_group FROM tide.consumer_groups g
   WHERE g.outbox_name = p_outbox AND g.group_name = p_group AND g.relay_group_id = p_relay_group_id;
  IF FOUND AND v_group.high IS NULL
     AND NOT EXISTS (SELECT 1 FROM tide.interval_messages(p_outbox, v_group.low, pg_current_snapshot())) THEN
    RETURN; -- idle: nothing committed since low
  END IF;
  v_group := tide.consumer_position(p_outbox, p_group, p_relay_group_id);
  FOR attempt IN 1..2 LOOP
    IF v_group.high IS NULL THEN
      v_high := pg_current_snapshot();
      SELECT min(m.id), max(m.id) INTO v_min, v_max FROM tide.interval_messages(p_outbox, v_group.low, v_high) m;
      IF v_min IS NULL THEN
        UPDATE tide.consumer_groups g SET low = v_high, updated_at = now()
         WHERE g.outbox_name = p_outbox AND g.group_name = p_group AND g.relay_group_id = p_relay_group_id;
        RETURN;
      END IF;
      UPDATE tide.consumer_groups g
         SET high = v_high, cursor_id = v_min - 1, interval_max_id = v_max, interval_seq = g.interval_seq + 1,
             updated_at = now()
       WHERE g.outbox_name = p_outbox AND g.group_name = p_group AND g.relay_group_id = p_relay_group_id
      RETURNING * INTO v_group;
    END IF;

    RETURN QUERY
      SELECT m.id, m.outbox, m.topic, m.payload, m.headers, m.created_at,
             v_group.interval_seq, v_group.cursor_id, v_group.generation
        FROM tide.outbox_messages m
       WHERE m.outbox = p_outbox
         AND m.id > v_group.cursor_id AND m.id <= v_group.interval_max_id
         AND pg_visible_in_snapshot(m.txid, v_group.high) AND NOT pg_visible_in_snapshot(m.txid, v_group.low)
       ORDER BY m.id
       LIMIT p_limit;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    IF v_rows > 0 THEN
      RETURN;
    END IF;
    -- Drained (possibly by messages swept or a rewind): close the interval and try the next one.
    UPDATE tide.consumer_groups g
       SET low = g.high, high = NULL, cursor_id = NULL, interval_max_id = NULL, updated_at = now()
     WHERE g.outbox_name = p_outbox AND g.group_name = p_group AND g.relay_group_id = p_relay_group_id
    RETURNING * INTO v_group;
  END LOOP;
END $$;

-- The next batch for a group (the messages of consumer_read_batch, without the fence).
CREATE FUNCTION tide.consumer_next_batch(p_outbox text, p_group text, p_limit integer DEFAULT 100,
                                         p_relay_group_id text DEFAULT 'default')
RETURNS SETOF tide.outbox_messages LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT m.* FROM tide.consumer_read_batch(p_outbox, p_group, p_limit, p_relay_group_id) b
    JOIN tide.outbox_messages m ON m.id = b.id
   ORDER BY m.id
$$;

-- Acknowledges everything of the open interval up to and including p_last_id. Called only after
-- the sink acknowledged, so a crash in between re-delivers the batch instead of losing it.
--
-- An acknowledgement can arrive late (a relay that lost its lock, a paused process that resumes,
-- a loop abandoned at shutdown), so it is checked before it moves anything; a stale one returns false
-- and the position stays where it is:
-- - p_last_id must be a message of the open interval, above the cursor. A message belongs to exactly
--   one interval, so an acknowledgement of a batch read from an earlier interval never closes a later
--   one (that would skip the later interval's lower ids). Within one interval a late acknowledgement
--   cannot skip: the batch it covers started at or below today's cursor, so every message up to
--   p_last_id was in it.
-- - With p_generation, the group must not have been rewound since the batch was read.
-- - With p_interval_seq and p_read_cursor (the relay always passes them), the interval and the cursor
--   must be exactly those the batch was read under: a compare-and-set, so that of two relays that
--   delivered the same batch only the first moves the position.
-- - With p_owner_epoch (the relay always passes it), the group must not have been claimed by another
--   owner since (consumer_claim): only the current owner moves the position.
-- Returns whether the position moved.
CREATE FUNCTION tide.consumer_commit(p_outbox text, p_group text, p_last_id bigint, p_count integer DEFAULT 0,
                                     p_relay_group_id text DEFAULT 'default', p_generation bigint DEFAULT NULL,
                                     p_interval_seq bigint DEFAULT NULL, p_read_cursor bigint DEFAULT NULL,
                                     p_owner_epoch bigint DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_group tide.consumer_groups;
BEGIN
  PERFORM tide.check_not_null('consumer_commit', 'p_outbox', p_outbox);
  PERFORM tide.check_not_null('consumer_commit', 'p_group', p_group);
  PERFORM tide.check_not_null('consumer_commit', 'p_last_id', p_last_id);
  PERFORM tide.check_not_null('consumer_commit', 'p_relay_group_id', p_relay_group_id);
  SELECT * INTO v_group FROM tide.consumer_groups
   WHERE outbox_name = p_outbox AND group_name = p_group AND relay_group_id = p_relay_group_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'consumer group "%" does not exist on outbox "%"', p_group, p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  IF v_group.high IS NULL OR p_last_id <= v_group.cursor_id OR p_last_id > v_group.interval_max_id THEN
    RETURN false; -- nothing open, an acknowledgement arriving twice, or one from another interval
  END IF;
  IF p_generation IS NOT NULL AND p_generation <> v_group.generation THEN
    RETURN false; -- the batch was read before a rewind
  END IF;
  IF p_owner_epoch IS NOT NULL AND p_owner_epoch <> v_group.owner_epoch THEN
    RETURN false; -- a former owner: the group was claimed since
  END IF;
  IF p_interval_seq IS NOT NULL AND (p_interval_seq <> v_group.interval_seq OR p_read_cursor IS DISTINCT FROM v_group.cursor_id) THEN
    RETURN false; -- read under another interval or cursor: someone else moved the position since
  END IF;
  IF NOT EXISTS (SELECT 1 FROM tide.outbox_messages m
                  WHERE m.outbox = p_outbox AND m.id = p_last_id
                    AND pg_visible_in_snapshot(m.txid, v_group.high)
                    AND NOT pg_visible_in_snapshot(m.txid, v_group.low)) THEN
    RETURN false; -- not a message of the open interval
  END IF;
  IF p_last_id >= v_group.interval_max_id THEN
    UPDATE tide.consumer_groups
       SET low = high, high = NULL, cursor_id = NULL, interval_max_id = NULL,
           committed_offset = greatest(committed_offset, p_last_id),
           delivered_total = delivered_total + coalesce(p_count, 0), updated_at = now()
     WHERE outbox_name = p_outbox AND group_name = p_group AND relay_group_id = p_relay_group_id;
  ELSE
    UPDATE tide.consumer_groups
       SET cursor_id = p_last_id, committed_offset = greatest(committed_offset, p_last_id),
           delivered_total = delivered_total + coalesce(p_count, 0), updated_at = now()
     WHERE outbox_name = p_outbox AND group_name = p_group AND relay_group_id = p_relay_group_id;
  END IF;
  RETURN true;
END $$;

-- Whether a group position has delivered a message.
CREATE FUNCTION tide.is_delivered(p_txid xid8, p_id bigint, p_low pg_snapshot, p_high pg_snapshot, p_cursor bigint)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
  SELECT pg_visible_in_snapshot(p_txid, p_low)
      OR (p_high IS NOT NULL AND pg_visible_in_snapshot(p_txid, p_high) AND p_id <= p_cursor)
$$;

-- Exact count of committed messages a position has not delivered yet.
CREATE FUNCTION tide.undelivered_count(p_outbox text, p_low pg_snapshot, p_high pg_snapshot, p_cursor bigint)
RETURNS bigint LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT count(*) FROM (
    SELECT m.id FROM tide.outbox_messages m
     WHERE m.outbox = p_outbox AND m.txid >= pg_snapshot_xmax(p_low)
       AND NOT tide.is_delivered(m.txid, m.id, p_low, p_high, p_cursor)
    UNION ALL
    SELECT m.id FROM tide.outbox_messages m
     WHERE m.outbox = p_outbox AND m.txid = ANY (ARRAY(SELECT pg_snapshot_xip(p_low)))
       AND NOT tide.is_delivered(m.txid, m.id, p_low, p_high, p_cursor)
  ) pending
$$;

CREATE VIEW tide.consumer_lag AS
SELECT g.group_name, g.outbox_name, g.consumer_id, g.committed_offset,
       tide.undelivered_count(g.outbox_name, g.low, g.high, g.cursor_id) AS lag,
       g.relay_group_id, g.updated_at
  FROM tide.consumer_groups g
 ORDER BY g.outbox_name, g.created_at, g.group_name, g.relay_group_id;

-- Messages that at least one consumer group has not delivered yet.
CREATE VIEW tide.outbox_pending AS
SELECT m.outbox AS outbox_name, m.id, m.topic, m.payload, m.headers, m.created_at,
       array_agg(g.group_name ORDER BY g.group_name) AS pending_groups
  FROM tide.outbox_messages m
  JOIN tide.consumer_groups g ON g.outbox_name = m.outbox
 WHERE m.txid >= pg_snapshot_xmin(g.low)
   AND NOT tide.is_delivered(m.txid, m.id, g.low, g.high, g.cursor_id)
 GROUP BY m.outbox, m.id
 ORDER BY m.outbox, m.id;
