-- 009: claiming inbox messages. Several instances of one service work the same inbox: each asks
-- tide.inbox_claim for up to N messages and gets messages no other worker holds, claimed for a
-- visibility timeout. A claim ends when its holder marks the message processed or failed; one that
-- runs out first makes the message claimable again, and that counts as a failed attempt.
--
-- A claim is fenced like a relay's acknowledgement (consumer_commit): every claim has a new id, the
-- row remembers the id of the claim holding it, and marking a message processed or failed is a
-- compare-and-set on that id. A worker whose claim ran out and was taken over by another worker is
-- refused with SQLSTATE TD001, inside its own transaction, so that the work it did under the lost
-- claim rolls back with it.
--
-- Row states (columns claim_id and visible_at, added to every inbox table by inbox_create):
--   never claimed, or released by a failure   claim_id NULL,     visible_at NULL or the retry time
--   held by a claim                           claim_id = claim,  visible_at = the claim's deadline, in the future
--   claim ran out                             claim_id = claim,  visible_at in the past
--   processed under a claim                   claim_id = claim,  processed_at set

-- Claim ids: one per inbox_claim call, shared by the messages it hands out.
CREATE SEQUENCE tide.inbox_claim_ids;

-- Up to p_limit messages of inbox p_name that no live claim holds, oldest first, claimed for
-- p_visibility_timeout under one new claim id. A message whose earlier claim ran out counts a failed
-- attempt first (retry_count + 1, last_error); at max_retries it becomes a dead letter instead of
-- being handed out again.
--
-- With p_ordering_key (a path into the payload or the headers, like '{headers,key}' or
-- '{payload,account_id}'), messages of one key are handed out one at a time: only a key's oldest
-- unfinished message can be claimed, and not while another message of that key is held. Messages
-- without the key are not ordered. Every worker of an inbox must pass the same key. Ordered claims
-- of one inbox take turns (a transaction advisory lock), so that each one sees the claims the
-- previous one made; they need READ COMMITTED, and each scans the inbox's unfinished messages.
CREATE FUNCTION tide.inbox_claim(p_name text, p_limit integer DEFAULT 10,
                                 p_visibility_timeout interval DEFAULT '30 seconds',
                                 p_ordering_key text[] DEFAULT NULL)
RETURNS TABLE (id bigint, event_id text, source text, payload jsonb, headers jsonb, received_at timestamptz,
               retry_count integer, last_error text, claim_id bigint, claimed_until timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_inbox tide.inboxes;
  v_now timestamptz;
  v_heads text := '';
  v_candidates text := 'TRUE';
BEGIN
  PERFORM tide.check_not_null('inbox_claim', 'p_name', p_name);
  PERFORM tide.check_not_null('inbox_claim', 'p_limit', p_limit);
  PERFORM tide.check_not_null('inbox_claim', 'p_visibility_timeout', p_visibility_timeout);
  IF p_limit < 1 THEN
    RAISE EXCEPTION 'tide.inbox_claim: p_limit must be at least 1 (got %)', p_limit USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_visibility_timeout <= interval '0' THEN
    RAISE EXCEPTION 'tide.inbox_claim: p_visibility_timeout must be positive (got %)', p_visibility_timeout
      USING ERRCODE = 'invalid_parameter_value', HINT = 'for example ''30 seconds''; make it longer than a handler takes';
  END IF;
  IF p_ordering_key IS NOT NULL THEN
    IF NOT coalesce(array_ndims(p_ordering_key) = 1 AND array_length(p_ordering_key, 1) >= 2
                    AND p_ordering_key[1] IN ('payload', 'headers') AND array_position(p_ordering_key, NULL) IS NULL,
                    false) THEN
      RAISE EXCEPTION 'tide.inbox_claim: p_ordering_key must be a path into the payload or the headers (got %)',
        quote_literal(p_ordering_key::text)
        USING ERRCODE = 'invalid_parameter_value', HINT = 'for example ''{headers,key}'' or ''{payload,account_id}''';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
      RAISE EXCEPTION 'tide.inbox_claim: claims with p_ordering_key need READ COMMITTED (the transaction is %)',
        current_setting('transaction_isolation')
        USING ERRCODE = 'invalid_transaction_state', HINT = 'claim in a transaction of its own, or outside one';
    END IF;
  END IF;
  PERFORM tide.inbox_table(p_name); -- names a missing inbox
  SELECT * INTO v_inbox FROM tide.inboxes i WHERE i.name = p_name;
  IF p_ordering_key IS NOT NULL THEN
    PERFORM pg_advisory_xact_lock(tide.inbox_claim_lock_key(v_inbox.table_name));
    v_heads := format($heads$
      unfinished AS (
        SELECT m.id,
               CASE WHEN $6[1] = 'payload' THEN m.payload #>> $6[2:] ELSE m.headers #>> $6[2:] END AS k,
               m.claim_id IS NOT NULL AND m.visible_at > $2 AS held,
               m.visible_at IS NULL OR m.visible_at <= $2 AS visible
          FROM tide.%1$I m
         WHERE m.processed_at IS NULL AND m.dead_lettered_at IS NULL AND m.retry_count < $1
      ), heads AS (
        -- Per key, the message that goes next; a key with a held message has none ready.
        SELECT DISTINCT ON (u.k IS NULL, coalesce(u.k, u.id::text)) u.id, NOT u.held AND u.visible AS ready
          FROM unfinished u
         ORDER BY u.k IS NULL, coalesce(u.k, u.id::text), u.held DESC, u.id
      ),$heads$, v_inbox.table_name);
    v_candidates := 'm.id = ANY (ARRAY(SELECT h.id FROM heads h WHERE h.ready))';
  END IF;
  -- Read after the lock: a statement of a volatile function sees what committed before it started.
  v_now := clock_timestamp();
  RETURN QUERY EXECUTE format($sql$
    WITH %2$s picked AS (
      SELECT m.id FROM tide.%1$I m
       WHERE m.processed_at IS NULL AND m.dead_lettered_at IS NULL AND m.retry_count < $1
         AND (m.visible_at IS NULL OR m.visible_at <= $2) AND %3$s
       ORDER BY m.id
       LIMIT $3
         FOR UPDATE SKIP LOCKED
    ), claimed AS (
      UPDATE tide.%1$I m
         SET retry_count = m.retry_count + CASE WHEN m.claim_id IS NULL THEN 0 ELSE 1 END,
             last_error = CASE WHEN m.claim_id IS NULL THEN m.last_error
                               ELSE 'claim ' || m.claim_id || ' ran out at ' || m.visible_at
                                    || ' before the message was marked processed or failed' END,
             dead_lettered_at = CASE WHEN m.claim_id IS NOT NULL AND m.retry_count + 1 >= $1 THEN $2 END,
             claim_id = CASE WHEN m.claim_id IS NOT NULL AND m.retry_count + 1 >= $1 THEN NULL ELSE $4 END,
             visible_at = CASE WHEN m.claim_id IS NOT NULL AND m.retry_count + 1 >= $1 THEN NULL ELSE $5 END
        FROM picked p
       WHERE m.id = p.id
      RETURNING m.*
    )
    SELECT c.id, c.event_id, c.source, c.payload, c.headers, c.received_at, c.retry_count, c.last_error,
           c.claim_id, c.visible_at
      FROM claimed c
     WHERE c.dead_lettered_at IS NULL
     ORDER BY c.id
  $sql$, v_inbox.table_name, v_heads, v_candidates)
  USING v_inbox.max_retries, v_now, p_limit, nextval('tide.inbox_claim_ids'), v_now + p_visibility_timeout,
        p_ordering_key;
END $$;

-- The advisory lock ordered claims of one inbox take turns on: the inbox table's oid under a
-- constant prefix (single-key advisory locks; the relay's pipeline locks use the two-key form).
CREATE FUNCTION tide.inbox_claim_lock_key(p_table text) RETURNS bigint
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT (7436009::bigint << 32) | to_regclass(format('tide.%I', p_table))::oid::bigint
$$;

-- Marks a claimed message processed, in the caller's transaction, if claim p_claim_id still holds
-- it (or held it last, even after it ran out, when no other worker has claimed the message since).
-- Returns true, or false when this claim already marked it. Refuses (TD001) when the claim was lost.
CREATE FUNCTION tide.inbox_mark_processed(p_name text, p_id bigint, p_claim_id bigint) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_table text;
  v_rows integer;
BEGIN
  PERFORM tide.check_not_null('inbox_mark_processed', 'p_name', p_name);
  PERFORM tide.check_not_null('inbox_mark_processed', 'p_id', p_id);
  PERFORM tide.check_not_null('inbox_mark_processed', 'p_claim_id', p_claim_id);
  v_table := tide.inbox_table(p_name);
  EXECUTE format('UPDATE tide.%I SET processed_at = now(), visible_at = NULL
                   WHERE id = $1 AND claim_id = $2 AND processed_at IS NULL', v_table)
    USING p_id, p_claim_id;
  GET DIAGNOSTICS v_rows = ROW_COUNT;
  IF v_rows = 1 THEN
    RETURN true;
  END IF;
  PERFORM tide.inbox_claim_refused(p_name, v_table, p_id, p_claim_id);
  RETURN false;
END $$;

-- The same for a batch a claim holds (one statement, for workers that mark what they claimed
-- together): marks every message of p_ids not processed yet; refuses (TD001) when the claim lost any
-- of them, so that none is marked. Returns how many it marked.
CREATE FUNCTION tide.inbox_mark_processed(p_name text, p_ids bigint[], p_claim_id bigint) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_table text;
  v_marked bigint[];
  v_id bigint;
BEGIN
  PERFORM tide.check_not_null('inbox_mark_processed', 'p_name', p_name);
  PERFORM tide.check_not_null('inbox_mark_processed', 'p_ids', p_ids);
  PERFORM tide.check_not_null('inbox_mark_processed', 'p_claim_id', p_claim_id);
  IF array_position(p_ids, NULL) IS NOT NULL THEN
    RAISE EXCEPTION 'tide.inbox_mark_processed: p_ids must not hold NULL' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  v_table := tide.inbox_table(p_name);
  EXECUTE format('WITH marked AS (
                    UPDATE tide.%I SET processed_at = now(), visible_at = NULL
                     WHERE id = ANY ($1) AND claim_id = $2 AND processed_at IS NULL RETURNING id)
                  SELECT coalesce(array_agg(id), ''{}'') FROM marked', v_table)
    INTO v_marked USING p_ids, p_claim_id;
  FOR v_id IN SELECT DISTINCT i FROM unnest(p_ids) i WHERE i <> ALL (v_marked) ORDER BY 1 LOOP
    PERFORM tide.inbox_claim_refused(p_name, v_table, v_id, p_claim_id);
  END LOOP;
  RETURN cardinality(v_marked);
END $$;

-- Records a failed attempt of a claimed message and ends the claim: retry_count + 1 and last_error;
-- at max_retries the message becomes a dead letter, otherwise it can be claimed again after
-- p_retry_delay. Returns the new retry count. Refuses (TD001) when the claim was lost.
CREATE FUNCTION tide.inbox_mark_failed(p_name text, p_id bigint, p_claim_id bigint, p_error text,
                                       p_retry_delay interval DEFAULT '0 seconds') RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_table text;
  v_count integer;
BEGIN
  PERFORM tide.check_not_null('inbox_mark_failed', 'p_name', p_name);
  PERFORM tide.check_not_null('inbox_mark_failed', 'p_id', p_id);
  PERFORM tide.check_not_null('inbox_mark_failed', 'p_claim_id', p_claim_id);
  PERFORM tide.check_not_null('inbox_mark_failed', 'p_retry_delay', p_retry_delay);
  IF p_retry_delay < interval '0' THEN
    RAISE EXCEPTION 'tide.inbox_mark_failed: p_retry_delay must not be negative (got %)', p_retry_delay
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  v_table := tide.inbox_table(p_name);
  EXECUTE format(
    'UPDATE tide.%I m
        SET retry_count = m.retry_count + 1, last_error = $3,
            dead_lettered_at = CASE WHEN m.retry_count + 1 >= i.max_retries THEN now() END,
            claim_id = NULL,
            visible_at = CASE WHEN $4 > interval ''0'' THEN clock_timestamp() + $4 END
       FROM tide.inboxes i
      WHERE i.name = $5 AND m.id = $1 AND m.claim_id = $2 AND m.processed_at IS NULL
     RETURNING m.retry_count', v_table)
    INTO v_count USING p_id, p_claim_id, p_error, p_retry_delay, p_name;
  IF v_count IS NOT NULL THEN
    RETURN v_count;
  END IF;
  RAISE EXCEPTION 'inbox "%": message % was already processed at %', p_name, p_id,
    tide.inbox_claim_refused(p_name, v_table, p_id, p_claim_id)
    USING ERRCODE = 'object_not_in_prerequisite_state';
END $$;

-- Moves the deadline of a claim that still holds its message to p_visibility_timeout from now, for a
-- handler that needs longer than it first asked for. Returns the new deadline, or NULL when this
-- claim already marked the message processed. Refuses (TD001) when the claim was lost.
CREATE FUNCTION tide.inbox_extend_claim(p_name text, p_id bigint, p_claim_id bigint,
                                        p_visibility_timeout interval) RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_table text;
  v_until timestamptz;
BEGIN
  PERFORM tide.check_not_null('inbox_extend_claim', 'p_name', p_name);
  PERFORM tide.check_not_null('inbox_extend_claim', 'p_id', p_id);
  PERFORM tide.check_not_null('inbox_extend_claim', 'p_claim_id', p_claim_id);
  PERFORM tide.check_not_null('inbox_extend_claim', 'p_visibility_timeout', p_visibility_timeout);
  IF p_visibility_timeout <= interval '0' THEN
    RAISE EXCEPTION 'tide.inbox_extend_claim: p_visibility_timeout must be positive (got %)', p_visibility_timeout
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  v_table := tide.inbox_table(p_name);
  EXECUTE format('UPDATE tide.%I SET visible_at = clock_timestamp() + $3
                   WHERE id = $1 AND claim_id = $2 AND processed_at IS NULL RETURNING visible_at', v_table)
    INTO v_until USING p_id, p_claim_id, p_visibility_timeout;
  IF v_until IS NOT NULL THEN
    RETURN v_until;
  END IF;
  PERFORM tide.inbox_claim_refused(p_name, v_table, p_id, p_claim_id);
  RETURN NULL;
END $$;

-- Why the compare-and-set of the functions above (an UPDATE of message p_id only where
-- claim_id = p_claim_id and it is not processed yet) changed nothing. When claim p_claim_id is still
-- the one the row records, the claim already marked it processed: returns processed_at. Otherwise
-- raises TD001 saying what became of the message (or no_data_found when there is no such message).
CREATE FUNCTION tide.inbox_claim_refused(p_name text, p_table text, p_id bigint, p_claim_id bigint)
RETURNS timestamptz LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_claim bigint;
  v_processed timestamptz;
  v_dead timestamptz;
  v_rows integer;
BEGIN
  EXECUTE format('SELECT m.claim_id, m.processed_at, m.dead_lettered_at FROM tide.%I m WHERE m.id = $1', p_table)
    INTO v_claim, v_processed, v_dead USING p_id;
  GET DIAGNOSTICS v_rows = ROW_COUNT;
  IF v_rows = 0 THEN
    RAISE EXCEPTION 'inbox "%" has no message with id %', p_name, p_id USING ERRCODE = 'no_data_found';
  END IF;
  IF v_claim = p_claim_id AND v_processed IS NOT NULL THEN
    RETURN v_processed;
  END IF;
  RAISE EXCEPTION 'inbox "%": claim % no longer holds message %: %', p_name, p_claim_id, p_id,
    CASE WHEN v_claim IS NOT NULL THEN format('claim %s holds it now (a claim that runs out lets another worker claim the message)', v_claim)
         WHEN v_processed IS NOT NULL THEN format('it was processed at %s', v_processed)
         WHEN v_dead IS NOT NULL THEN format('it is a dead letter since %s', v_dead)
         ELSE 'it was marked failed or replayed since' END
    USING ERRCODE = 'TD001',
          HINT = 'roll back what was done under this claim: the message is no longer this worker''s. If handlers need '
                 'longer, claim with a longer visibility timeout or extend the claim with tide.inbox_extend_claim';
END $$;

-- The first p_limit rows of inbox_pending(text): a large backlog comes back a page at a time, and
-- the next call returns what is still pending. Workers that run side by side use inbox_claim.
CREATE FUNCTION tide.inbox_pending(p_name text, p_limit integer)
RETURNS TABLE (id bigint, event_id text, source text, payload jsonb, headers jsonb,
               received_at timestamptz, retry_count integer, last_error text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_not_null('inbox_pending', 'p_name', p_name);
  PERFORM tide.check_not_null('inbox_pending', 'p_limit', p_limit);
  IF p_limit < 1 THEN
    RAISE EXCEPTION 'tide.inbox_pending: p_limit must be at least 1 (got %)', p_limit USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN QUERY EXECUTE format(
    'SELECT i.id, i.event_id, i.source, i.payload, i.headers, i.received_at, i.retry_count, i.last_error
       FROM tide.%I i
      WHERE i.processed_at IS NULL AND i.retry_count < $1
      ORDER BY i.id
      LIMIT $2', tide.inbox_table(p_name))
  USING (SELECT m.max_retries FROM tide.inboxes m WHERE m.name = p_name), p_limit;
END $$;

-- Per inbox: pending (not processed and not dead-lettered: what inbox_pending returns), and of those
-- claimed (held by a live claim) and failed (failed at least once, waiting for or in a retry);
-- dead_lettered; and when the oldest pending message arrived. Counts only, no content: the
-- monitoring view below runs it for tide_reader.
CREATE FUNCTION tide.inbox_counts(p_name text, OUT pending bigint, OUT claimed bigint, OUT failed bigint,
                                  OUT dead_lettered bigint, OUT oldest_pending_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_not_null('inbox_counts', 'p_name', p_name);
  EXECUTE format(
    'SELECT count(*) FILTER (WHERE NOT dead), count(*) FILTER (WHERE NOT dead AND held),
            count(*) FILTER (WHERE NOT dead AND retry_count > 0), count(*) FILTER (WHERE dead),
            min(received_at) FILTER (WHERE NOT dead)
       FROM (SELECT m.retry_count, m.received_at,
                    m.dead_lettered_at IS NOT NULL OR m.retry_count >= $1 AS dead,
                    m.claim_id IS NOT NULL AND m.visible_at > now() AS held
               FROM tide.%I m WHERE m.processed_at IS NULL) s', tide.inbox_table(p_name))
    INTO pending, claimed, failed, dead_lettered, oldest_pending_at
    USING (SELECT i.max_retries FROM tide.inboxes i WHERE i.name = p_name);
END $$;

CREATE VIEW tide.inbox_stats AS
  SELECT i.name AS inbox, c.pending, c.claimed, c.failed, c.dead_lettered, c.oldest_pending_at
    FROM tide.inboxes i, LATERAL tide.inbox_counts(i.name) c;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA tide FROM PUBLIC;
REVOKE ALL ON tide.inbox_stats, tide.inbox_claim_ids FROM PUBLIC;

-- Applications work their inboxes.
GRANT EXECUTE ON FUNCTION
  tide.inbox_claim(text, integer, interval, text[]),
  tide.inbox_mark_processed(text, bigint, bigint),
  tide.inbox_mark_processed(text, bigint[], bigint),
  tide.inbox_mark_failed(text, bigint, bigint, text, interval),
  tide.inbox_extend_claim(text, bigint, bigint, interval),
  tide.inbox_pending(text, integer)
TO tide_publisher;

GRANT SELECT ON tide.inbox_stats TO tide_reader, tide_relay;
GRANT EXECUTE ON FUNCTION tide.inbox_pending(text, integer), tide.inbox_counts(text) TO tide_reader;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA tide TO tide_relay;
