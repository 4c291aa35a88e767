-- 003: inboxes. Each inbox is its own table tide."<name>_inbox"; the unique event_id makes a
-- redelivered message a no-op. Rows that failed max_retries times are the inbox's dead letters.

CREATE TABLE tide.inboxes (
  name                      text PRIMARY KEY,
  table_name                text NOT NULL UNIQUE,
  max_retries               integer NOT NULL DEFAULT 3 CHECK (max_retries > 0),
  processed_retention_hours integer NOT NULL DEFAULT 72 CHECK (processed_retention_hours >= 0),
  -- 0 keeps dead letters until someone deals with them.
  dlq_retention_hours       integer NOT NULL DEFAULT 0 CHECK (dlq_retention_hours >= 0),
  created_at                timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION tide.inbox_table(p_name text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_table text;
BEGIN
  SELECT table_name INTO v_table FROM tide.inboxes WHERE name = p_name;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'inbox "%" does not exist', p_name
      USING ERRCODE = 'undefined_object', HINT = 'create it with tide.inbox_create(''' || p_name || ''')';
  END IF;
  RETURN v_table;
END $$;

CREATE FUNCTION tide.inbox_create(p_name text, p_max_retries integer DEFAULT 3,
                                  p_processed_retention_hours integer DEFAULT 72,
                                  p_dlq_retention_hours integer DEFAULT 0)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_table text := p_name || '_inbox';
BEGIN
  PERFORM tide.check_name('inbox', p_name, 57);
  IF p_max_retries IS NULL OR p_max_retries < 1 THEN
    RAISE EXCEPTION 'inbox "%": max_retries must be at least 1 (got %)', p_name, p_max_retries
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM tide.check_not_null('inbox_create', 'p_processed_retention_hours', p_processed_retention_hours);
  PERFORM tide.check_not_null('inbox_create', 'p_dlq_retention_hours', p_dlq_retention_hours);
  IF p_processed_retention_hours < 0 OR p_dlq_retention_hours < 0 THEN
    RAISE EXCEPTION 'inbox "%": retention hours must be 0 or more (got processed %, dlq %)',
      p_name, p_processed_retention_hours, p_dlq_retention_hours USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF EXISTS (SELECT 1 FROM tide.inboxes WHERE name = p_name) THEN
    RAISE EXCEPTION 'inbox "%" already exists', p_name USING ERRCODE = 'duplicate_object';
  END IF;
  IF to_regclass(format('tide.%I', v_table)) IS NOT NULL THEN
    RAISE EXCEPTION 'inbox "%": table tide.% already exists', p_name, quote_ident(v_table) USING ERRCODE = 'duplicate_table';
  END IF;
  INSERT INTO tide.inboxes (name, table_name, max_retries, processed_retention_hours, dlq_retention_hours)
  VALUES (p_name, v_table, p_max_retries, p_processed_retention_hours, p_dlq_retention_hours);
  EXECUTE format($ddl$
    CREATE TABLE tide.%1$I (
      id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
      event_id         text NOT NULL UNIQUE,
      source           text,
      payload          jsonb NOT NULL,
      headers          jsonb NOT NULL DEFAULT '{}',
      received_at      timestamptz NOT NULL DEFAULT now(),
      processed_at     timestamptz,
      retry_count      integer NOT NULL DEFAULT 0,
      last_error       text,
      dead_lettered_at timestamptz,
      -- Claims (009_inbox_claims.sql): the claim holding the row, and when it may be claimed next.
      claim_id         bigint,
      visible_at       timestamptz
    );
    CREATE INDEX ON tide.%1$I (id) WHERE processed_at IS NULL;
    CREATE INDEX ON tide.%1$I (id) WHERE processed_at IS NULL AND dead_lettered_at IS NULL;
    GRANT SELECT ON tide.%1$I TO tide_reader, tide_publisher;
    GRANT SELECT, INSERT, UPDATE, DELETE ON tide.%1$I TO tide_relay;
  $ddl$, v_table);
END $$;

CREATE FUNCTION tide.inbox_drop(p_name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_table text;
  v_pipeline text;
BEGIN
  PERFORM tide.check_not_null('inbox_drop', 'p_name', p_name);
  v_table := tide.inbox_table(p_name);
  SELECT name INTO v_pipeline FROM tide.relay_pipelines WHERE inbox_name = p_name LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'inbox "%" is used by pipeline "%"', p_name, v_pipeline
      USING ERRCODE = 'dependent_objects_still_exist', HINT = 'delete the pipeline first with tide.relay_delete';
  END IF;
  EXECUTE format('DROP TABLE tide.%I', v_table);
  DELETE FROM tide.inboxes WHERE name = p_name;
END $$;

CREATE FUNCTION tide.inbox_pending(p_name text)
RETURNS TABLE (id bigint, event_id text, source text, payload jsonb, headers jsonb,
               received_at timestamptz, retry_count integer, last_error text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_table text;
BEGIN
  PERFORM tide.check_not_null('inbox_pending', 'p_name', p_name);
  v_table := tide.inbox_table(p_name);
  RETURN QUERY EXECUTE format(
    'SELECT i.id, i.event_id, i.source, i.payload, i.headers, i.received_at, i.retry_count, i.last_error
       FROM tide.%I i
      WHERE i.processed_at IS NULL AND i.retry_count < $1
      ORDER BY i.id', v_table)
  USING (SELECT max_retries FROM tide.inboxes WHERE name = p_name);
END $$;

-- Shared by the two inbox_mark_processed forms: p_where is a fixed predicate on $1.
CREATE FUNCTION tide.inbox_mark_processed_where(p_name text, p_where text, p_key anyelement)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_table text := tide.inbox_table(p_name);
  v_processed timestamptz;
  v_rows integer;
BEGIN
  -- EXECUTE does not set FOUND; the row count says whether the message exists.
  EXECUTE format('SELECT processed_at FROM tide.%I WHERE %s FOR UPDATE', v_table, p_where)
    INTO v_processed USING p_key;
  GET DIAGNOSTICS v_rows = ROW_COUNT;
  IF v_rows = 0 THEN
    RAISE EXCEPTION 'inbox "%" has no message with % %', p_name,
      CASE WHEN p_where LIKE 'id%' THEN 'id' ELSE 'event_id' END, quote_literal(p_key::text)
      USING ERRCODE = 'no_data_found';
  END IF;
  IF v_processed IS NOT NULL THEN
    RETURN false;
  END IF;
  EXECUTE format('UPDATE tide.%I SET processed_at = now() WHERE %s', v_table, p_where) USING p_key;
  RETURN true;
END $$;

-- An event id as an inbox stores it. The unique index cannot hold a very long id (a btree entry must
-- fit in a third of a page), and one such id would fail its whole batch: ids longer than 512 UTF-8
-- bytes become 'sha256:<hex>' of those bytes. core/config/event_id.ts applies the same rule in the relay.
CREATE FUNCTION tide.inbox_event_id(p_event_id text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE WHEN octet_length(convert_to(p_event_id, 'UTF8')) > 512
              THEN 'sha256:' || encode(sha256(convert_to(p_event_id, 'UTF8')), 'hex')
              ELSE p_event_id END;
$$;

CREATE FUNCTION tide.inbox_mark_processed(p_name text, p_event_id text) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT tide.check_not_null('inbox_mark_processed', 'p_name', p_name);
  SELECT tide.check_not_null('inbox_mark_processed', 'p_event_id', p_event_id);
  SELECT tide.inbox_mark_processed_where(p_name, 'event_id = tide.inbox_event_id($1)', p_event_id);
$$;

CREATE FUNCTION tide.inbox_mark_processed(p_name text, p_id bigint) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT tide.check_not_null('inbox_mark_processed', 'p_name', p_name);
  SELECT tide.check_not_null('inbox_mark_processed', 'p_id', p_id);
  SELECT tide.inbox_mark_processed_where(p_name, 'id = $1', p_id);
$$;

-- Counts a failed processing attempt; at max_retries the row becomes a dead letter. Returns the
-- new retry count.
CREATE FUNCTION tide.inbox_mark_failed(p_name text, p_event_id text, p_error text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_table text;
  v_max integer;
  v_processed timestamptz;
  v_count integer;
BEGIN
  PERFORM tide.check_not_null('inbox_mark_failed', 'p_name', p_name);
  PERFORM tide.check_not_null('inbox_mark_failed', 'p_event_id', p_event_id);
  v_table := tide.inbox_table(p_name);
  v_max := (SELECT max_retries FROM tide.inboxes WHERE name = p_name);
  EXECUTE format('SELECT processed_at FROM tide.%I WHERE event_id = $1 FOR UPDATE', v_table)
    INTO v_processed USING tide.inbox_event_id(p_event_id);
  GET DIAGNOSTICS v_count = ROW_COUNT;
  IF v_count = 0 THEN
    RAISE EXCEPTION 'inbox "%" has no message with event_id %', p_name, quote_literal(p_event_id)
      USING ERRCODE = 'no_data_found';
  END IF;
  IF v_processed IS NOT NULL THEN
    RAISE EXCEPTION 'inbox "%": message % was already processed at %', p_name, quote_literal(p_event_id), v_processed
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  EXECUTE format(
    'UPDATE tide.%I SET retry_count = retry_count + 1, last_error = $2,
            dead_lettered_at = CASE WHEN retry_count + 1 >= $3 THEN now() END
      WHERE event_id = $1 RETURNING retry_count', v_table)
    INTO v_count USING tide.inbox_event_id(p_event_id), p_error, v_max;
  RETURN v_count;
END $$;

CREATE FUNCTION tide.replay_inbox_messages(p_name text, p_event_ids text[]) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_table text;
  v_count integer;
BEGIN
  PERFORM tide.check_not_null('replay_inbox_messages', 'p_name', p_name);
  PERFORM tide.check_not_null('replay_inbox_messages', 'p_event_ids', p_event_ids);
  v_table := tide.inbox_table(p_name);
  EXECUTE format(
    'UPDATE tide.%I SET processed_at = NULL, retry_count = 0, last_error = NULL, dead_lettered_at = NULL,
                        claim_id = NULL, visible_at = NULL
      WHERE event_id = ANY (ARRAY(SELECT tide.inbox_event_id(e) FROM unnest($1::text[]) e))', v_table)
    USING p_event_ids;
  GET DIAGNOSTICS v_count = ROW_COUNT;
  RETURN v_count;
END $$;


-- The relay's write path: one round trip per batch. p_messages is a JSON array of
-- {event_id, source, payload, headers}; duplicates (by event_id) are counted, not errors.
-- Event ids are bounded by tide.inbox_event_id.
CREATE FUNCTION tide.inbox_insert_batch(p_name text, p_messages jsonb, OUT inserted integer, OUT duplicates integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_table text;
BEGIN
  PERFORM tide.check_not_null('inbox_insert_batch', 'p_name', p_name);
  PERFORM tide.check_not_null('inbox_insert_batch', 'p_messages', p_messages);
  v_table := tide.inbox_table(p_name);
  IF jsonb_typeof(p_messages) IS DISTINCT FROM 'array' THEN
    RAISE EXCEPTION 'inbox "%": messages must be a JSON array', p_name USING ERRCODE = 'invalid_parameter_value';
  END IF;
  EXECUTE format(
    'INSERT INTO tide.%I (event_id, source, payload, headers)
     SELECT tide.inbox_event_id(m->>''event_id''), m->>''source'', coalesce(m->''payload'', ''null''), coalesce(m->''headers'', ''{}'')
       FROM jsonb_array_elements($1) WITH ORDINALITY AS e(m, ord)
      ORDER BY ord
     ON CONFLICT (event_id) DO NOTHING', v_table)
    USING p_messages;
  GET DIAGNOSTICS inserted = ROW_COUNT;
  duplicates := jsonb_array_length(p_messages) - inserted;
END $$;
