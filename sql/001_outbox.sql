-- 001: outboxes and their messages.
--
-- All outboxes share one message table. Every row records the transaction that wrote it (txid):
-- consumer positions are transaction snapshots (see 002), so a row that commits late is never
-- skipped even though its id was allocated early.

CREATE TABLE tide.plugin_types (
  type          text NOT NULL,
  kind          text NOT NULL CHECK (kind IN ('sink', 'source')),
  builtin       boolean NOT NULL DEFAULT false,
  -- Each inner array lists alternatives of which at least one key must be present.
  required_keys jsonb NOT NULL DEFAULT '[]',
  registered_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (type, kind)
);

INSERT INTO tide.plugin_types (type, kind, builtin, required_keys) VALUES
  ('kafka',   'sink',   true, '[["brokers"], ["topic", "topic_template"]]'),
  ('nats',    'sink',   true, '[["url"], ["subject", "subject_template"]]'),
  ('webhook', 'sink',   true, '[["url", "url_template"]]'),
  ('inbox',   'sink',   true, '[["inbox"]]'),
  ('stdout',  'sink',   true, '[]'),
  ('file',    'sink',   true, '[["path"]]'),
  ('rabbitmq', 'sink',  true, '[["url"], ["routing_key", "routing_key_template"]]'),
  ('redis',   'sink',   true, '[["url"], ["stream", "stream_template"]]'),
  ('mqtt',    'sink',   true, '[["url"], ["topic", "topic_template"]]'),
  ('nats',    'source', true, '[["url"], ["subject"]]'),
  ('kafka',   'source', true, '[["brokers"], ["topic", "topics"]]'),
  ('webhook', 'source', true, '[["path"]]'),
  ('rabbitmq', 'source', true, '[["url"], ["queue"]]'),
  ('redis',   'source', true, '[["url"], ["stream"]]'),
  ('mqtt',    'source', true, '[["url"], ["topic", "topics"]]');

CREATE TABLE tide.outboxes (
  name            text PRIMARY KEY,
  retention_hours integer NOT NULL DEFAULT 72 CHECK (retention_hours > 0),
  enabled         boolean NOT NULL DEFAULT true,
  -- NOTIFY takes a cluster-wide lock at commit; it is opt-in per outbox (the relay also polls).
  notify          boolean NOT NULL DEFAULT false,
  created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tide.outbox_messages (
  id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  outbox     text NOT NULL,
  topic      text,
  payload    jsonb NOT NULL,
  headers    jsonb NOT NULL DEFAULT '{}',
  txid       xid8 NOT NULL DEFAULT pg_current_xact_id(),
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_messages_outbox_txid ON tide.outbox_messages (outbox, txid, id);
CREATE INDEX outbox_messages_outbox_id ON tide.outbox_messages (outbox, id);

-- Names are data: they become table names and NOTIFY payloads, so they are checked once here.
CREATE FUNCTION tide.check_name(p_kind text, p_name text, p_max_length integer DEFAULT 63)
RETURNS text LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF p_name IS NULL OR p_name !~ '^[A-Za-z_][A-Za-z0-9_-]*$' OR length(p_name) > p_max_length THEN
    RAISE EXCEPTION 'invalid % name %: use letters, digits, "_" and "-", starting with a letter or "_", at most % characters',
      p_kind, coalesce(quote_literal(p_name), 'NULL'), p_max_length
      USING ERRCODE = 'invalid_name';
  END IF;
  RETURN p_name;
END $$;

-- Every API function names a NULL argument instead of failing somewhere deeper with a message about
-- something else (or silently doing nothing).
CREATE FUNCTION tide.check_not_null(p_function text, p_argument text, p_value anyelement)
RETURNS void LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF p_value IS NULL THEN
    RAISE EXCEPTION 'tide.%: % must not be NULL', p_function, p_argument USING ERRCODE = 'null_value_not_allowed';
  END IF;
END $$;

CREATE FUNCTION tide.outbox_create(p_name text, p_retention_hours integer DEFAULT 72, p_notify boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_name('outbox', p_name);
  PERFORM tide.check_not_null('outbox_create', 'p_notify', p_notify);
  IF p_retention_hours IS NULL OR p_retention_hours <= 0 THEN
    RAISE EXCEPTION 'outbox "%": retention hours must be a positive number (got %)', p_name, p_retention_hours
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  INSERT INTO tide.outboxes (name, retention_hours, notify) VALUES (p_name, p_retention_hours, p_notify);
EXCEPTION WHEN unique_violation THEN
  RAISE EXCEPTION 'outbox "%" already exists', p_name
    USING ERRCODE = 'duplicate_object', HINT = 'use tide.outbox_create_if_not_exists to ignore an existing outbox';
END $$;

CREATE FUNCTION tide.outbox_create_if_not_exists(p_name text, p_retention_hours integer DEFAULT 72, p_notify boolean DEFAULT false)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_name('outbox', p_name);
  PERFORM tide.check_not_null('outbox_create_if_not_exists', 'p_notify', p_notify);
  IF EXISTS (SELECT 1 FROM tide.outboxes WHERE name = p_name) THEN
    RETURN false;
  END IF;
  PERFORM tide.outbox_create(p_name, p_retention_hours, p_notify);
  RETURN true;
END $$;

CREATE FUNCTION tide.outbox_publish(p_outbox text, p_topic text, p_payload jsonb, p_headers jsonb DEFAULT '{}')
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_outbox tide.outboxes;
  v_id bigint;
  v_traceparent text;
BEGIN
  IF p_outbox IS NULL THEN -- inline, not check_not_null: this is the publish path
    RAISE EXCEPTION 'tide.outbox_publish: p_outbox must not be NULL' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  SELECT * INTO v_outbox FROM tide.outboxes WHERE name = p_outbox;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'outbox "%" does not exist', p_outbox
      USING ERRCODE = 'undefined_object', HINT = 'create it with tide.outbox_create(''' || p_outbox || ''')';
  END IF;
  IF NOT v_outbox.enabled THEN
    RAISE EXCEPTION 'outbox "%" is disabled', p_outbox
      USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'enable it with tide.outbox_enable(''' || p_outbox || ''')';
  END IF;
  IF p_payload IS NULL THEN
    RAISE EXCEPTION 'outbox "%": payload must not be NULL', p_outbox USING ERRCODE = 'null_value_not_allowed';
  END IF;
  -- outbox_publish('o', '{"a": 1}', '{"event_type": "x"}') without casts resolves to this form (an
  -- untyped literal prefers text), which would store the payload as the topic. JSON may start and
  -- end with whitespace (space, tab, newline, carriage return).
  IF btrim(p_topic, E' \t\n\r') LIKE '{%}' OR btrim(p_topic, E' \t\n\r') LIKE '[%]' THEN -- LIKE: cheap on the publish path
    RAISE EXCEPTION 'outbox "%": the topic looks like JSON (%); was it meant as the payload?', p_outbox, left(p_topic, 60)
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'cast JSON arguments: tide.outbox_publish(''' || p_outbox || ''', ''{...}''::jsonb, ''{...}''::jsonb)';
  END IF;
  IF p_headers IS NOT NULL AND jsonb_typeof(p_headers) <> 'object' THEN
    RAISE EXCEPTION 'outbox "%": headers must be a JSON object (got %)', p_outbox, jsonb_typeof(p_headers)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- W3C trace context from the transaction (SET LOCAL tide.traceparent = '00-<trace id>-<span id>-<flags>')
  -- when the headers carry none. A value that is not a traceparent is ignored, never an error: tracing
  -- must not fail a business transaction. Unset (NULL or ''), it costs one setting read and one
  -- comparison; the pattern and the headers are looked at only when it is set.
  v_traceparent := current_setting('tide.traceparent', true);
  IF v_traceparent > '' THEN
    IF v_traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
       AND v_traceparent NOT LIKE 'ff-%' AND v_traceparent NOT LIKE '__-00000000000000000000000000000000-%'
       AND v_traceparent NOT LIKE '%-0000000000000000-__'
       AND (p_headers IS NULL OR NOT p_headers ? 'traceparent') THEN
      p_headers := coalesce(p_headers, '{}') || jsonb_build_object('traceparent', v_traceparent);
    END IF;
  END IF;
  INSERT INTO tide.outbox_messages (outbox, topic, payload, headers)
  VALUES (p_outbox, p_topic, p_payload, coalesce(p_headers, '{}'))
  RETURNING id INTO v_id;
  IF v_outbox.notify THEN
    PERFORM pg_notify('tide_outbox_notify', p_outbox);
  END IF;
  RETURN v_id;
END $$;

-- PL/pgSQL, not SQL: a SQL function with a SET clause is not inlined and is planned again on every
-- call, which showed up in publish latency (bench/publish.ts).
CREATE FUNCTION tide.outbox_publish(p_outbox text, p_payload jsonb, p_headers jsonb DEFAULT '{}')
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  RETURN tide.outbox_publish(p_outbox, NULL::text, p_payload, p_headers);
END $$;

CREATE FUNCTION tide.outbox_enable(p_name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_not_null('outbox_enable', 'p_name', p_name);
  UPDATE tide.outboxes SET enabled = true WHERE name = p_name;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'outbox "%" does not exist', p_name USING ERRCODE = 'undefined_object';
  END IF;
END $$;

CREATE FUNCTION tide.outbox_disable(p_name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_not_null('outbox_disable', 'p_name', p_name);
  UPDATE tide.outboxes SET enabled = false WHERE name = p_name;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'outbox "%" does not exist', p_name USING ERRCODE = 'undefined_object';
  END IF;
END $$;
