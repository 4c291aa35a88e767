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
  -- A running count that keeps the exact lag cheap however long the backlog (consumer_group_lag):
  -- the messages of the open interval above cursor_id (counted when it opens, decremented by each
  -- acknowledgement), and the messages committed after the position that a checkpoint has counted
  -- (visible in counted_to, not in high, or low when no interval is open).
  interval_pending  bigint,
  counted_to        pg_snapshot,
  counted_pending   bigint NOT NULL DEFAULT 0,
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
-- xmax(low), or in progress at low, can qualify, which keeps the index range small (a transaction
-- at or above xmax(low) is never visible in low, so the first branch need not ask).
--
-- A SQL-standard body (names bound when it is created, no SET clause), so that the planner inlines it
-- into the calling query: a caller that takes only ids (opening an interval, the idle probe, lag
-- counts) reads the (outbox, txid, id) index and never a payload, and EXISTS stops at the first
-- message. A function with SET search_path runs apart and collects every row, payload included,
-- before its caller sees one.
CREATE FUNCTION tide.interval_messages(p_outbox text, p_low pg_snapshot, p_high pg_snapshot)
RETURNS SETOF tide.outbox_messages LANGUAGE sql STABLE
BEGIN ATOMIC
  SELECT m.* FROM tide.outbox_messages m
   WHERE m.outbox = p_outbox
     AND m.txid >= pg_snapshot_xmax(p_low) AND m.txid < pg_snapshot_xmax(p_high)
     AND pg_visible_in_snapshot(m.txid, p_high)
  UNION ALL
  SELECT m.* FROM tide.outbox_messages m
   WHERE m.outbox = p_outbox
     AND m.txid = ANY (ARRAY(SELECT pg_snapshot_xip(p_low)))
     AND pg_visible_in_snapshot(m.txid, p_high);
END;

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
--
-- p_durable := false (what the relay passes) lets the calling transaction commit without waiting for
-- its WAL to reach disk (synchronous_commit off for that transaction; see consumer_commit).
CREATE FUNCTION tide.consumer_read_batch(p_outbox text, p_group text, p_limit integer DEFAULT 100,
                                         p_relay_group_id text DEFAULT 'default', p_durable boolean DEFAULT true)
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
  IF p_durable IS FALSE THEN
    PERFORM set_config('synchronous_commit', 'off', true);
  END IF;
  v_group := tide.consumer_position(p_outbox, p_group, p_relay_group_id);
  FOR attempt IN 1..2 LOOP
    IF v_group.high IS NULL THEN
      v_high := pg_current_snapshot();
      -- Ids only (interval_messages is inlined): an index-only range, however large the payloads.
      SELECT min(m.id), max(m.id), count(*) INTO v_min, v_max, v_count
        FROM tide.interval_messages(p_outbox, v_group.low, v_high) m;
      IF v_min IS NULL THEN
        -- Nothing committed between low and v_high, so nothing a checkpoint counted either.
        UPDATE tide.consumer_groups g SET low = v_high, counted_to = NULL, counted_pending = 0, updated_at = now()
         WHERE g.outbox_name = p_outbox AND g.group_name = p_group AND g.relay_group_id = p_relay_group_id;
        RETURN;
      END IF;
      -- Whatever a checkpoint counted past low is in this interval now (counted_to is older than v_high).
      UPDATE tide.consumer_groups g
         SET high = v_high, cursor_id = v_min - 1, interval_max_id = v_max, interval_seq = g.interval_seq + 1,
             interval_pending = v_count, counted_to = NULL, counted_pending = 0, updated_at = now()
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
       SET low = g.high, high = NULL, cursor_id = NULL, interval_max_id = NULL, interval_pending = NULL, updated_at = now()
     WHERE g.outbox_name = p_outbox AND g.group_name = p_group AND g.relay_group_id = p_relay_group_id
    RETURNING * INTO v_group;
  END LOOP;
END $$;

-- The batch after the one a relay is delivering, read while that one is still in flight: the next
-- messages of the open interval after p_after_id (the last id of the batch in flight), that is, from
-- the position that batch's acknowledgement will leave. Read-only: nothing is locked or written.
-- Each row carries the fence of that position (read_cursor = p_after_id), so its own acknowledgement
-- is accepted only if the one before it moved the cursor to exactly p_after_id. Returns nothing when
-- the interval, the generation or the cursor is no longer the one the caller read under, or when the
-- interval ends at p_after_id: the caller then reads with consumer_read_batch after acknowledging.
-- Why this is the batch a read after the acknowledgement would return: an interval's messages are
-- fixed when it opens (visible in high, not in low, at most interval_max_id), and interval_seq and
-- generation identify that interval; an acknowledgement up to p_after_id leaves the cursor there.
CREATE FUNCTION tide.consumer_read_ahead(p_outbox text, p_group text, p_limit integer, p_relay_group_id text,
                                         p_interval_seq bigint, p_generation bigint, p_after_id bigint)
RETURNS TABLE (id bigint, outbox text, topic text, payload jsonb, headers jsonb, created_at timestamptz,
               interval_seq bigint, read_cursor bigint, generation bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  v_group tide.consumer_groups;
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
  RETURN QUERY
    SELECT m.id, m.outbox, m.topic, m.payload, m.headers, m.created_at, v_group.interval_seq, p_after_id, v_group.generation
      FROM tide.outbox_messages m
     WHERE m.outbox = p_outbox
       AND m.id > p_after_id AND m.id <= v_group.interval_max_id
       AND pg_visible_in_snapshot(m.txid, v_group.high) AND NOT pg_visible_in_snapshot(m.txid, v_group.low)
     ORDER BY m.id
     LIMIT p_limit;
END $$;

-- Which of the given groups (of one relay group) have something to read: an open interval, or a
-- message committed since low; a group whose row does not exist yet counts as ready. Read-only and
-- cheap (an index range per group): one call asks for every waiting pipeline of a relay, so that
-- idle pipelines do not each poll the outbox.
CREATE FUNCTION tide.consumer_probe(p_relay_group_id text, p_outboxes text[], p_groups text[])
RETURNS TABLE (outbox_name text, group_name text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_not_null('consumer_probe', 'p_relay_group_id', p_relay_group_id);
  IF cardinality(p_outboxes) IS DISTINCT FROM cardinality(p_groups) THEN
    RAISE EXCEPTION 'tide.consumer_probe: p_outboxes and p_groups must be arrays of the same length'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN QUERY
    SELECT w.outbox, w.grp
      FROM unnest(p_outboxes, p_groups) AS w (outbox, grp)
      LEFT JOIN tide.consumer_groups g
        ON g.outbox_name = w.outbox AND g.group_name = w.grp AND g.relay_group_id = p_relay_group_id
     WHERE g.outbox_name IS NULL OR g.high IS NOT NULL
        OR EXISTS (SELECT 1 FROM tide.interval_messages(w.outbox, g.low, pg_current_snapshot()));
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
--
-- p_durable := false (what the relay passes) lets the calling transaction commit without waiting for
-- its WAL to reach disk (synchronous_commit off for that transaction), which saves a disk flush per
-- batch. Only a crash of the server itself can then lose the last moments of acknowledgements: the
-- position comes back a little older and those messages are delivered again, never skipped. Claims
-- (consumer_claim) stay durable, so an owner epoch is never handed out twice.
CREATE FUNCTION tide.consumer_commit(p_outbox text, p_group text, p_last_id bigint, p_count integer DEFAULT 0,
                                     p_relay_group_id text DEFAULT 'default', p_generation bigint DEFAULT NULL,
                                     p_interval_seq bigint DEFAULT NULL, p_read_cursor bigint DEFAULT NULL,
                                     p_owner_epoch bigint DEFAULT NULL, p_durable boolean DEFAULT true)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_group tide.consumer_groups;
  v_acked bigint;
  v_found bigint;
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
  -- The interval's messages this acknowledges (counted for interval_pending), p_last_id among them.
  SELECT count(*), count(*) FILTER (WHERE m.id = p_last_id) INTO v_acked, v_found
    FROM tide.outbox_messages m
   WHERE m.outbox = p_outbox AND m.id > v_group.cursor_id AND m.id <= p_last_id
     AND pg_visible_in_snapshot(m.txid, v_group.high) AND NOT pg_visible_in_snapshot(m.txid, v_group.low);
  IF v_found = 0 THEN
    RETURN false; -- not a message of the open interval
  END IF;
  IF p_durable IS FALSE THEN
    PERFORM set_config('synchronous_commit', 'off', true);
  END IF;
  IF p_last_id >= v_group.interval_max_id THEN
    UPDATE tide.consumer_groups
       SET low = high, high = NULL, cursor_id = NULL, interval_max_id = NULL, interval_pending = NULL,
           committed_offset = greatest(committed_offset, p_last_id),
           delivered_total = delivered_total + coalesce(p_count, 0), updated_at = now()
     WHERE outbox_name = p_outbox AND group_name = p_group AND relay_group_id = p_relay_group_id;
  ELSE
    UPDATE tide.consumer_groups
       SET cursor_id = p_last_id, interval_pending = interval_pending - v_acked,
           committed_offset = greatest(committed_offset, p_last_id),
           delivered_total = delivered_total + coalesce(p_count, 0), updated_at = now()
     WHERE outbox_name = p_outbox AND group_name = p_group AND relay_group_id = p_relay_group_id;
  END IF;
  RETURN true;
END $$;

-- Acknowledges a batch (consumer_commit, same fence and checks) and, when the position moved, reads
-- the next batch from there (consumer_read_batch) in the same transaction: one round trip per batch
-- for the relay instead of two. The first column says whether the acknowledgement moved the
-- position; the rows are the next batch, with its fence. When there is no next batch, or the
-- acknowledgement was refused, one row comes back with `moved` and NULL everywhere else.
CREATE FUNCTION tide.consumer_commit_read(p_outbox text, p_group text, p_last_id bigint, p_count integer,
                                          p_relay_group_id text, p_generation bigint, p_interval_seq bigint,
                                          p_read_cursor bigint, p_owner_epoch bigint, p_limit integer,
                                          p_durable boolean DEFAULT true)
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
  RETURN QUERY SELECT true, b.* FROM tide.consumer_read_batch(p_outbox, p_group, p_limit, p_relay_group_id, p_durable) b;
  IF NOT FOUND THEN
    RETURN QUERY SELECT true, NULL::bigint, NULL::text, NULL::text, NULL::jsonb, NULL::jsonb, NULL::timestamptz,
                        NULL::bigint, NULL::bigint, NULL::bigint;
  END IF;
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

-- The exact lag of a group (NULL when it does not exist), counting only what its running count has
-- not: the open interval's messages above the cursor (interval_pending), those a checkpoint counted
-- (counted_pending), and those committed since the checkpoint, or since the position when there was
-- none. An index-only count of the messages since the last checkpoint, not of the whole backlog.
CREATE FUNCTION tide.consumer_group_lag(p_outbox text, p_group text, p_relay_group_id text DEFAULT 'default')
RETURNS bigint LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT coalesce(g.interval_pending, 0) + g.counted_pending
         + (SELECT count(*) FROM tide.interval_messages(g.outbox_name, coalesce(g.counted_to, g.high, g.low),
                                                        pg_current_snapshot()))
    FROM tide.consumer_groups g
   WHERE g.outbox_name = p_outbox AND g.group_name = p_group AND g.relay_group_id = p_relay_group_id
$$;

-- Adds the messages committed since each group's last count to its running count (counted_to,
-- counted_pending), so that consumer_group_lag never counts them again. Writes only the groups that
-- have something new, and only if their position has not moved meanwhile. Relays run it every few
-- seconds, one session at a time: it returns NULL, doing nothing, while another session runs it.
-- Otherwise it returns how many groups it updated.
CREATE FUNCTION tide.consumer_lag_checkpoint() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_now pg_snapshot := pg_current_snapshot();
  v_updated integer;
BEGIN
  IF NOT pg_try_advisory_xact_lock(7436001004) THEN
    RETURN NULL;
  END IF;
  WITH counted AS (
    SELECT g.outbox_name, g.group_name, g.relay_group_id, g.low::text AS low, g.high::text AS high,
           g.counted_to::text AS counted_to,
           (SELECT count(*) FROM tide.interval_messages(g.outbox_name, coalesce(g.counted_to, g.high, g.low), v_now)) AS n
      FROM tide.consumer_groups g)
  UPDATE tide.consumer_groups g SET counted_to = v_now, counted_pending = g.counted_pending + c.n
    FROM counted c
   WHERE c.n > 0 AND g.outbox_name = c.outbox_name AND g.group_name = c.group_name
     AND g.relay_group_id = c.relay_group_id
     -- Compared as text (pg_snapshot has no equality): a position that moved meanwhile has counted
     -- these messages its own way.
     AND g.low::text = c.low AND g.high::text IS NOT DISTINCT FROM c.high
     AND g.counted_to::text IS NOT DISTINCT FROM c.counted_to;
  GET DIAGNOSTICS v_updated = ROW_COUNT;
  RETURN v_updated;
END $$;

CREATE VIEW tide.consumer_lag AS
SELECT g.group_name, g.outbox_name, g.consumer_id, g.committed_offset,
       tide.consumer_group_lag(g.outbox_name, g.group_name, g.relay_group_id) AS lag,
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
