-- 007: table capture. Every INSERT, UPDATE and DELETE of a captured table becomes an outbox message
-- in the writing transaction, through statement-level triggers with transition tables (one INSERT
-- into the outbox per statement, not per row). No replication slot is involved.
--
-- Payload: {"record": <row after, or before for a delete>, "changes": <old values of the changed
-- columns, updates only>, "action": "insert" | "update" | "delete" | "read"}.
-- Headers: {"op", "table_schema", "table_name", "key": <primary key columns>}; topic "<schema>.<table>".

CREATE TABLE tide.captures (
  table_oid   oid NOT NULL,
  outbox_name text NOT NULL REFERENCES tide.outboxes (name) ON DELETE CASCADE,
  operations  text[] NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (table_oid, outbox_name)
);

CREATE TABLE tide.capture_backfills (
  table_oid   oid NOT NULL,
  outbox_name text NOT NULL REFERENCES tide.outboxes (name) ON DELETE CASCADE,
  last_key    jsonb,
  rows_done   bigint NOT NULL DEFAULT 0,
  started_at  timestamptz NOT NULL DEFAULT now(),
  finished_at timestamptz,
  PRIMARY KEY (table_oid, outbox_name)
);

-- The primary key columns of a table, in key order; an error when it has none.
CREATE FUNCTION tide.primary_key_columns(p_table regclass) RETURNS text[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_columns text[];
BEGIN
  SELECT array_agg(a.attname::text ORDER BY k.ord) INTO v_columns
    FROM pg_index i
    CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
   WHERE i.indrelid = p_table AND i.indisprimary;
  IF v_columns IS NULL THEN
    RAISE EXCEPTION 'table % has no primary key; capture needs one to key messages and pair updates', p_table
      USING ERRCODE = 'invalid_table_definition';
  END IF;
  RETURN v_columns;
END $$;

CREATE FUNCTION tide.row_key(p_row jsonb, p_columns text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_object_agg(c, p_row -> c) FROM unnest(p_columns) AS c
$$;

CREATE FUNCTION tide.capture_headers(p_op text, p_schema text, p_table text, p_key jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_build_object('op', p_op, 'table_schema', p_schema, 'table_name', p_table, 'key', p_key)
$$;

-- The trigger behind every capture. TG_ARGV[0] is the outbox, TG_ARGV[1] the primary key columns
-- (recorded by capture_table, so no catalog lookup per statement). SECURITY DEFINER: writers need no
-- rights on the outbox table. Transition tables carry no statistics, so the planner would pair old
-- and new rows of a large UPDATE with a nested loop; a hash join keeps it linear. JIT is off: its
-- compile time (~200 ms) dwarfs the statement. Each row's JSON is built once (OFFSET 0, MATERIALIZED).
CREATE FUNCTION tide.capture_trigger() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_nestloop = off SET enable_mergejoin = off SET jit = off AS $$
DECLARE
  v_outbox text := TG_ARGV[0];
  v_key text[] := coalesce(TG_ARGV[1]::text[], tide.primary_key_columns(TG_RELID));
  -- The key as a plain expression over the row's JSON (a generic function per row costs ~9 µs).
  v_key_of text := 'jsonb_build_object(' ||
    (SELECT string_agg(format('%L, %%1$s -> %L', c, c), ', ') FROM unnest(v_key) c) || ')';
  v_headers text := 'jsonb_build_object(''op'', %s, ''table_schema'', $2, ''table_name'', $3, ''key'', %s)';
BEGIN
  IF NOT EXISTS (SELECT 1 FROM tide.outboxes WHERE name = v_outbox AND enabled) THEN
    RAISE EXCEPTION 'capture of %.%: outbox "%" does not exist or is disabled', TG_TABLE_SCHEMA, TG_TABLE_NAME, v_outbox
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF TG_OP IN ('INSERT', 'DELETE') THEN
    EXECUTE format(
      'INSERT INTO tide.outbox_messages (outbox, topic, payload, headers)
       SELECT $1, $2 || ''.'' || $3, jsonb_build_object(''record'', r.j, ''changes'', NULL, ''action'', %1$L), %2$s
         FROM (SELECT to_jsonb(x) AS j FROM %3$s x OFFSET 0) r',
      lower(TG_OP), format(v_headers, quote_literal(lower(TG_OP)), format(v_key_of, 'r.j')),
      CASE TG_OP WHEN 'INSERT' THEN 'tide_new_rows' ELSE 'tide_old_rows' END)
    USING v_outbox, TG_TABLE_SCHEMA, TG_TABLE_NAME;
  ELSE
    -- Old and new rows pair up by primary key. A row whose key changed shows up as a delete of the
    -- old key and an insert of the new one.
    EXECUTE format(
      'INSERT INTO tide.outbox_messages (outbox, topic, payload, headers)
       SELECT $1, $2 || ''.'' || $3,
              jsonb_build_object(''record'', coalesce(n.j, o.j),
                ''changes'', CASE WHEN n.j IS NOT NULL AND o.j IS NOT NULL THEN
                  coalesce((SELECT jsonb_object_agg(e.key, e.value) FROM jsonb_each(o.j) e
                             WHERE n.j -> e.key IS DISTINCT FROM e.value), ''{}'') END,
                ''action'', a.op), %1$s
         FROM (SELECT s.j, %2$s AS k FROM (SELECT to_jsonb(x) AS j FROM tide_new_rows x OFFSET 0) s OFFSET 0) n
         FULL JOIN (SELECT s.j, %2$s AS k FROM (SELECT to_jsonb(x) AS j FROM tide_old_rows x OFFSET 0) s OFFSET 0) o
           ON o.k = n.k
         CROSS JOIN LATERAL (SELECT CASE WHEN o.j IS NULL THEN ''insert'' WHEN n.j IS NULL THEN ''delete''
                                         ELSE ''update'' END AS op) a
        ORDER BY CASE a.op WHEN ''delete'' THEN 0 WHEN ''update'' THEN 1 ELSE 2 END',
      format(v_headers, 'a.op', 'coalesce(n.k, o.k)'), format(v_key_of, 's.j'))
    USING v_outbox, TG_TABLE_SCHEMA, TG_TABLE_NAME;
  END IF;
  RETURN NULL;
END $$;

-- Capture runs with the caller's own rights where they matter: capture_table and uncapture_table
-- create and drop the triggers as the caller (PostgreSQL lets only the table's owner do that), and a
-- backfill reads the table as the caller (so it needs SELECT on it). Only the bookkeeping, and the
-- writes into the outbox, go through the SECURITY DEFINER helpers below, which check what they can.

-- Starts capturing a table's changes into an outbox. The caller must own the table.
CREATE FUNCTION tide.capture_table(p_table regclass, p_outbox text,
                                   p_operations text[] DEFAULT ARRAY['insert', 'update', 'delete'])
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_op text;
  v_bad text;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM tide.outboxes WHERE name = p_outbox) THEN
    RAISE EXCEPTION 'outbox "%" does not exist', p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  SELECT string_agg(quote_literal(o), ', ') INTO v_bad FROM unnest(p_operations) o WHERE o NOT IN ('insert', 'update', 'delete');
  IF v_bad IS NOT NULL OR coalesce(cardinality(p_operations), 0) = 0 THEN
    RAISE EXCEPTION 'capture of %: operations must be a non-empty list of insert, update, delete (got %)',
      p_table, coalesce(v_bad, 'an empty list') USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM tide.primary_key_columns(p_table);
  IF EXISTS (SELECT 1 FROM tide.captures WHERE table_oid = p_table AND outbox_name = p_outbox) THEN
    RAISE EXCEPTION 'table % is already captured into outbox "%"', p_table, p_outbox USING ERRCODE = 'duplicate_object';
  END IF;
  IF NOT pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = p_table), 'USAGE') THEN
    RAISE EXCEPTION 'capture of %: only the table''s owner can capture it (you are %)', p_table, current_user
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  FOREACH v_op IN ARRAY ARRAY['insert', 'update', 'delete'] LOOP
    CONTINUE WHEN NOT v_op = ANY (p_operations);
    EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s FOR EACH STATEMENT EXECUTE FUNCTION tide.capture_trigger(%L, %L)',
      tide.capture_trigger_name(p_outbox, v_op), upper(v_op), p_table,
      CASE v_op WHEN 'insert' THEN 'NEW TABLE AS tide_new_rows'
                WHEN 'delete' THEN 'OLD TABLE AS tide_old_rows'
                ELSE 'OLD TABLE AS tide_old_rows NEW TABLE AS tide_new_rows' END,
      p_outbox, tide.primary_key_columns(p_table)::text);
  END LOOP;
  PERFORM tide.capture_register(p_table, p_outbox, p_operations);
END $$;

CREATE FUNCTION tide.capture_trigger_name(p_outbox text, p_op text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT left('tide_capture_' || p_op || '_' || p_outbox, 63) $$;

-- The capture triggers of an outbox that exist on a table, by operation.
CREATE FUNCTION tide.capture_triggers(p_table regclass, p_outbox text) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT coalesce(array_agg(op ORDER BY op), '{}') FROM unnest(ARRAY['delete', 'insert', 'update']) op
   WHERE EXISTS (SELECT 1 FROM pg_trigger t
                  WHERE t.tgrelid = p_table AND t.tgname = tide.capture_trigger_name(p_outbox, op)
                    AND t.tgfoid = 'tide.capture_trigger()'::regprocedure)
$$;

-- Records a capture whose triggers the caller has just created: refused unless they exist, so the
-- record always describes triggers that the table's owner made.
CREATE FUNCTION tide.capture_register(p_table regclass, p_outbox text, p_operations text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF NOT tide.capture_triggers(p_table, p_outbox) @> p_operations THEN
    RAISE EXCEPTION 'capture of % into "%": its triggers do not exist; use tide.capture_table', p_table, p_outbox
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  INSERT INTO tide.captures (table_oid, outbox_name, operations) VALUES (p_table, p_outbox, p_operations);
END $$;

-- Stops capturing. The caller must own the table (dropping the triggers checks it).
CREATE FUNCTION tide.uncapture_table(p_table regclass, p_outbox text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_op text;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM tide.captures WHERE table_oid = p_table AND outbox_name = p_outbox) THEN
    RAISE EXCEPTION 'table % is not captured into outbox "%"', p_table, p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  FOREACH v_op IN ARRAY tide.capture_triggers(p_table, p_outbox) LOOP
    EXECUTE format('DROP TRIGGER %I ON %s', tide.capture_trigger_name(p_outbox, v_op), p_table);
  END LOOP;
  PERFORM tide.capture_unregister(p_table, p_outbox);
END $$;

-- Forgets a capture (and its backfill progress) once its triggers are gone.
CREATE FUNCTION tide.capture_unregister(p_table regclass, p_outbox text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF cardinality(tide.capture_triggers(p_table, p_outbox)) > 0 THEN
    RAISE EXCEPTION 'capture of % into "%": its triggers still exist; use tide.uncapture_table', p_table, p_outbox
      USING ERRCODE = 'object_in_use';
  END IF;
  DELETE FROM tide.captures WHERE table_oid = p_table AND outbox_name = p_outbox;
  DELETE FROM tide.capture_backfills WHERE table_oid = p_table AND outbox_name = p_outbox;
END $$;

-- One backfill chunk: the next p_chunk rows after the saved key, read with the caller's rights and
-- published as "read" events, with the progress saved in the same transaction. Returns the rows
-- published (0: finished).
CREATE FUNCTION tide.capture_backfill_chunk(p_table regclass, p_outbox text, p_chunk integer DEFAULT 1000)
RETURNS integer LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_key text[] := tide.primary_key_columns(p_table);
  v_last jsonb;
  v_rows jsonb;
  v_cols text := (SELECT string_agg(format('t.%I', c), ', ') FROM unnest(v_key) c);
  v_kcols text := (SELECT string_agg(format('k.%I', c), ', ') FROM unnest(v_key) c);
BEGIN
  IF NOT EXISTS (SELECT 1 FROM tide.outboxes WHERE name = p_outbox) THEN
    RAISE EXCEPTION 'outbox "%" does not exist', p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  SELECT last_key INTO v_last FROM tide.capture_backfills WHERE table_oid = p_table AND outbox_name = p_outbox;
  EXECUTE format($q$
    SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY %2$s), '[]') FROM (
      SELECT * FROM %1$s t
       WHERE $1 IS NULL OR (%2$s) > (SELECT %3$s FROM jsonb_populate_record(NULL::%1$s, $1) k)
       ORDER BY %2$s LIMIT $2) t
  $q$, p_table, v_cols, v_kcols)
  INTO v_rows USING v_last, p_chunk;
  RETURN tide.capture_backfill_publish(p_table, p_outbox, v_rows, p_chunk);
END $$;

-- Publishes a chunk of rows (a JSON array in key order) as "read" events and moves the table's
-- backfill progress past the last one; a chunk shorter than p_chunk finishes the backfill.
-- Publishing needs no more than outbox_publish does; the rows come from capture_backfill_chunk.
CREATE FUNCTION tide.capture_backfill_publish(p_table regclass, p_outbox text, p_rows jsonb, p_chunk integer)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_key text[] := tide.primary_key_columns(p_table);
  v_schema text;
  v_name text;
  v_count integer := jsonb_array_length(p_rows);
BEGIN
  IF NOT EXISTS (SELECT 1 FROM tide.outboxes WHERE name = p_outbox AND enabled) THEN
    RAISE EXCEPTION 'outbox "%" does not exist or is disabled', p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  SELECT n.nspname, c.relname INTO v_schema, v_name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_table;
  INSERT INTO tide.outbox_messages (outbox, topic, payload, headers)
  SELECT p_outbox, v_schema || '.' || v_name, jsonb_build_object('record', r.j, 'changes', NULL, 'action', 'read'),
         tide.capture_headers('read', v_schema, v_name, tide.row_key(r.j, v_key))
    FROM jsonb_array_elements(p_rows) WITH ORDINALITY AS r(j, n)
   ORDER BY r.n;
  INSERT INTO tide.capture_backfills AS b (table_oid, outbox_name, last_key, rows_done, finished_at)
  VALUES (p_table, p_outbox, tide.row_key(p_rows -> -1, v_key), v_count,
          CASE WHEN v_count < p_chunk THEN now() END)
  ON CONFLICT (table_oid, outbox_name) DO UPDATE
     SET last_key = coalesce(excluded.last_key, b.last_key), rows_done = b.rows_done + excluded.rows_done,
         finished_at = excluded.finished_at;
  RETURN v_count;
END $$;

-- Forgets a table's backfill progress, so the next backfill starts from the first row.
CREATE FUNCTION tide.capture_backfill_reset(p_table regclass, p_outbox text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  DELETE FROM tide.capture_backfills WHERE table_oid = p_table AND outbox_name = p_outbox
$$;

-- Publishes every existing row of a table as a "read" event, a chunk per transaction, so no lock is
-- held for long. Resumable: after a crash, CALL it again and it continues after the last committed
-- chunk. p_restart starts over from the first row. Must be CALLed outside a transaction block.
CREATE PROCEDURE tide.capture_backfill(p_table regclass, p_outbox text, p_chunk integer DEFAULT 1000,
                                       p_restart boolean DEFAULT false)
-- No SET search_path here: a procedure with SET clauses cannot COMMIT. Every name is qualified.
LANGUAGE plpgsql AS $$
DECLARE
  v_done integer;
BEGIN
  IF p_chunk IS NULL OR p_chunk < 1 THEN
    RAISE EXCEPTION 'capture_backfill: chunk must be at least 1 (got %)', p_chunk USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_restart THEN
    PERFORM tide.capture_backfill_reset(p_table, p_outbox);
  ELSIF EXISTS (SELECT 1 FROM tide.capture_backfills
                 WHERE table_oid = p_table AND outbox_name = p_outbox AND finished_at IS NOT NULL) THEN
    RAISE NOTICE 'backfill of % into "%" already finished; pass p_restart => true to run it again', p_table, p_outbox;
    RETURN;
  END IF;
  COMMIT;
  LOOP
    v_done := tide.capture_backfill_chunk(p_table, p_outbox, p_chunk);
    COMMIT;
    EXIT WHEN v_done < p_chunk;
  END LOOP;
END $$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA tide FROM PUBLIC;
REVOKE EXECUTE ON ALL PROCEDURES IN SCHEMA tide FROM PUBLIC;
REVOKE ALL ON tide.captures, tide.capture_backfills FROM PUBLIC;
GRANT SELECT ON tide.captures, tide.capture_backfills TO tide_reader, tide_relay, tide_publisher;
-- capture_table checks the outbox exists as the caller.
GRANT SELECT ON tide.outboxes TO tide_publisher;
-- Creating a trigger needs EXECUTE on its function (firing it does not): table owners get it via tide_publisher.
GRANT EXECUTE ON FUNCTION tide.capture_trigger() TO tide_publisher, tide_relay;
GRANT EXECUTE ON FUNCTION tide.capture_table(regclass, text, text[]), tide.uncapture_table(regclass, text),
  tide.capture_backfill_chunk(regclass, text, integer), tide.primary_key_columns(regclass),
  tide.capture_trigger_name(text, text), tide.capture_triggers(regclass, text),
  tide.capture_register(regclass, text, text[]), tide.capture_unregister(regclass, text),
  tide.capture_backfill_publish(regclass, text, jsonb, integer), tide.capture_backfill_reset(regclass, text)
  TO tide_publisher, tide_relay;
GRANT EXECUTE ON PROCEDURE tide.capture_backfill(regclass, text, integer, boolean) TO tide_publisher, tide_relay;
