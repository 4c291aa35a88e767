-- 007: table capture. Every INSERT, UPDATE and DELETE of a captured table becomes an outbox message
-- in the writing transaction, through statement-level triggers with transition tables (one INSERT
-- into the outbox per statement, not per row). No replication slot is involved.
--
-- Payload: {"record": <row after, or before for a delete>, "changes": <old values of the changed
-- columns, updates only>, "action": "insert" | "update" | "delete" | "read"}.
-- Headers: {"op", "table_schema", "table_name", "key": <primary key columns>}; topic "<schema>.<table>".
--
-- Rights. Turning a row into JSON can run code chosen by whoever defined the column types (a cast to
-- json, an output function), so it always happens with the rights of the role that wrote or reads
-- the rows, never the schema owner's: the trigger function and the backfill reader are SECURITY
-- INVOKER. They hand plain jsonb to two narrow SECURITY DEFINER helpers that only write the outbox
-- (capture_publish, capture_publish_reads). The bookkeeping tables are written with the caller's own
-- rights too, under row-level security: only a table's owner records, forgets or moves the capture
-- and backfill of that table.

CREATE TABLE tide.captures (
  table_oid     oid NOT NULL,
  outbox_name   text NOT NULL REFERENCES tide.outboxes (name) ON DELETE CASCADE,
  operations    text[] NOT NULL
                CHECK (cardinality(operations) > 0 AND operations <@ ARRAY['insert', 'update', 'delete']),
  -- The trigger capture_table created for each operation, in the same order. capture_publish
  -- publishes for these triggers only.
  trigger_names text[] NOT NULL CHECK (cardinality(trigger_names) = cardinality(operations)),
  created_at    timestamptz NOT NULL DEFAULT now(),
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

-- Everyone who may read these tables sees every row; a row is written only by a role with the
-- rights of its table's owner (the schema owner, who runs the SECURITY DEFINER functions, is exempt).
ALTER TABLE tide.captures ENABLE ROW LEVEL SECURITY;
ALTER TABLE tide.capture_backfills ENABLE ROW LEVEL SECURITY;
CREATE POLICY captures_read ON tide.captures FOR SELECT USING (true);
CREATE POLICY captures_table_owner ON tide.captures FOR ALL
  USING (pg_catalog.pg_has_role(CURRENT_USER, (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = table_oid), 'USAGE'))
  WITH CHECK (pg_catalog.pg_has_role(CURRENT_USER, (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = table_oid), 'USAGE'));
CREATE POLICY capture_backfills_read ON tide.capture_backfills FOR SELECT USING (true);
CREATE POLICY capture_backfills_table_owner ON tide.capture_backfills FOR ALL
  USING (pg_catalog.pg_has_role(CURRENT_USER, (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = table_oid), 'USAGE'))
  WITH CHECK (pg_catalog.pg_has_role(CURRENT_USER, (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = table_oid), 'USAGE'));

-- One captured change, as capture_trigger hands it to capture_publish: plain jsonb built with the
-- writer's rights. An array of these, not one JSON array: aggregating 100,000 rows into a single
-- jsonb value takes several times as long as into an array.
CREATE TYPE tide.capture_change AS (action text, record jsonb, changes jsonb, key jsonb);

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

-- STABLE, as jsonb_build_object is: an IMMUTABLE SQL function around a stable call is not inlined,
-- and a call per captured row that is not inlined is parsed and planned again every statement.
CREATE FUNCTION tide.capture_headers(p_op text, p_schema text, p_table text, p_key jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object('op', p_op, 'table_schema', p_schema, 'table_name', p_table, 'key', p_key)
$$;

-- Refuses unless the caller has the rights of the table's owner. Only meaningful where the caller is
-- current_user: in SECURITY INVOKER functions (row-level security enforces the same on the tables).
CREATE FUNCTION tide.check_table_owner(p_table regclass, p_action text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF NOT pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = p_table), 'USAGE') THEN
    RAISE EXCEPTION 'capture of %: only the table''s owner can % (you are %)', p_table, p_action, current_user
      USING ERRCODE = 'insufficient_privilege';
  END IF;
END $$;

-- The operations of a capture, checked, without duplicates and in a fixed order.
CREATE FUNCTION tide.capture_operations(p_table regclass, p_operations text[]) RETURNS text[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_bad text;
BEGIN
  SELECT string_agg(coalesce(quote_literal(o), 'NULL'), ', ') INTO v_bad
    FROM unnest(p_operations) o WHERE o IS NULL OR o NOT IN ('insert', 'update', 'delete');
  IF v_bad IS NOT NULL OR coalesce(cardinality(p_operations), 0) = 0 THEN
    RAISE EXCEPTION 'capture of %: operations must be a non-empty list of insert, update, delete (got %)',
      p_table, coalesce(v_bad, CASE WHEN p_operations IS NULL THEN 'NULL' ELSE 'an empty list' END)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN ARRAY(SELECT op FROM unnest(ARRAY['insert', 'update', 'delete']) WITH ORDINALITY AS k(op, ord)
                WHERE op = ANY (p_operations) ORDER BY ord);
END $$;

-- The trigger behind every capture, run with the rights of the role that wrote to the table.
-- TG_ARGV[0] is the outbox (for people reading \d), TG_ARGV[1] the primary key columns (recorded by
-- capture_table, so no catalog lookup per statement). Static SQL, not EXECUTE: PL/pgSQL compiles a
-- trigger function once per trigger and keeps its plans for the session, where a dynamic statement
-- was parsed and planned on every captured statement. Transition tables carry no statistics, so the
-- planner would pair old and new rows of a large UPDATE with a nested loop; a hash join keeps it
-- linear. JIT is off: its compile time (~200 ms) dwarfs the statement. Each row's JSON is built once
-- (OFFSET 0); its key is a plain expression (a generic function per row costs ~9 µs).
CREATE FUNCTION tide.capture_trigger() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET enable_nestloop = off SET enable_mergejoin = off SET jit = off AS $$
DECLARE
  v_declared boolean;
  v_may_publish boolean;
  v_key text[];
BEGIN
  -- The rows are read from tide_new_rows / tide_old_rows by name: only a trigger that declares them
  -- as its transition tables may run, so that those names cannot mean anything else. Writers need
  -- tide_publisher: USAGE on the schema and EXECUTE on capture_publish. One statement for both.
  SELECT EXISTS (
           SELECT 1 FROM pg_trigger t
            WHERE t.tgrelid = TG_RELID AND t.tgname = TG_NAME
              AND t.tgnewtable IS NOT DISTINCT FROM CASE WHEN TG_OP IN ('INSERT', 'UPDATE') THEN 'tide_new_rows' END
              AND t.tgoldtable IS NOT DISTINCT FROM CASE WHEN TG_OP IN ('DELETE', 'UPDATE') THEN 'tide_old_rows' END),
         has_schema_privilege('tide', 'USAGE')
           AND coalesce((SELECT has_function_privilege(p.oid, 'EXECUTE') FROM pg_proc p
                          WHERE p.proname = 'capture_publish' AND p.pronamespace = 'tide'::regnamespace), false)
    INTO v_declared, v_may_publish;
  IF TG_LEVEL <> 'STATEMENT' OR TG_WHEN <> 'AFTER' OR TG_NARGS <> 2 OR NOT v_declared THEN
    RAISE EXCEPTION 'trigger % on %.% was not created by tide.capture_table', quote_ident(TG_NAME),
      quote_ident(TG_TABLE_SCHEMA), quote_ident(TG_TABLE_NAME)
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = format('drop it (DROP TRIGGER %I ON %I.%I) and capture the table with tide.capture_table',
                          TG_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME);
  END IF;
  IF NOT v_may_publish THEN
    RAISE EXCEPTION 'capture of %.%: role % writes to this captured table but may not publish its changes',
      quote_ident(TG_TABLE_SCHEMA), quote_ident(TG_TABLE_NAME), current_user
      USING ERRCODE = 'insufficient_privilege', HINT = format('GRANT tide_publisher TO %I', current_user);
  END IF;
  v_key := TG_ARGV[1]::text[];
  IF TG_OP = 'INSERT' THEN
    PERFORM tide.capture_publish(TG_RELID, TG_NAME, array_agg(ROW('insert', r.j, NULL,
              CASE WHEN cardinality(v_key) = 1 THEN jsonb_build_object(v_key[1], r.j -> v_key[1])
                   ELSE (SELECT jsonb_object_agg(c, r.j -> c) FROM unnest(v_key) c) END)::tide.capture_change))
       FROM (SELECT to_jsonb(x) AS j FROM tide_new_rows x OFFSET 0) r HAVING count(*) > 0;
  ELSIF TG_OP = 'DELETE' THEN
    PERFORM tide.capture_publish(TG_RELID, TG_NAME, array_agg(ROW('delete', r.j, NULL,
              CASE WHEN cardinality(v_key) = 1 THEN jsonb_build_object(v_key[1], r.j -> v_key[1])
                   ELSE (SELECT jsonb_object_agg(c, r.j -> c) FROM unnest(v_key) c) END)::tide.capture_change))
       FROM (SELECT to_jsonb(x) AS j FROM tide_old_rows x OFFSET 0) r HAVING count(*) > 0;
  ELSE
    -- Old and new rows pair up by primary key. A row whose key changed shows up as a delete of the
    -- old key and an insert of the new one.
    PERFORM tide.capture_publish(TG_RELID, TG_NAME, array_agg(ROW(a.op, coalesce(n.j, o.j),
              CASE WHEN n.j IS NOT NULL AND o.j IS NOT NULL THEN
                coalesce((SELECT jsonb_object_agg(e.key, e.value) FROM jsonb_each(o.j) e
                           WHERE n.j -> e.key IS DISTINCT FROM e.value), '{}') END,
              coalesce(n.k, o.k))::tide.capture_change
            ORDER BY CASE a.op WHEN 'delete' THEN 0 WHEN 'update' THEN 1 ELSE 2 END))
       FROM (SELECT s.j, CASE WHEN cardinality(v_key) = 1 THEN jsonb_build_object(v_key[1], s.j -> v_key[1])
                              ELSE (SELECT jsonb_object_agg(c, s.j -> c) FROM unnest(v_key) c) END AS k
               FROM (SELECT to_jsonb(x) AS j FROM tide_new_rows x OFFSET 0) s OFFSET 0) n
       FULL JOIN (SELECT s.j, CASE WHEN cardinality(v_key) = 1 THEN jsonb_build_object(v_key[1], s.j -> v_key[1])
                                   ELSE (SELECT jsonb_object_agg(c, s.j -> c) FROM unnest(v_key) c) END AS k
                    FROM (SELECT to_jsonb(x) AS j FROM tide_old_rows x OFFSET 0) s OFFSET 0) o
         ON o.k = n.k
       CROSS JOIN LATERAL (SELECT CASE WHEN o.j IS NULL THEN 'insert' WHEN n.j IS NULL THEN 'delete'
                                       ELSE 'update' END AS op) a
      HAVING count(*) > 0;
  END IF;
  RETURN NULL;
END $$;

-- The operation a trigger captures when it is exactly what capture_table creates: AFTER <op> FOR
-- EACH STATEMENT, on tide.capture_trigger, with the transition tables that function reads. NULL for
-- any other trigger (or none).
CREATE FUNCTION tide.capture_trigger_op(p_table oid, p_trigger name) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE t.tgtype WHEN 4 THEN 'insert' WHEN 8 THEN 'delete' WHEN 16 THEN 'update' END
    FROM pg_trigger t
   WHERE t.tgrelid = p_table AND t.tgname = p_trigger AND t.tgfoid = 'tide.capture_trigger()'::regprocedure
     AND t.tgnewtable IS NOT DISTINCT FROM CASE WHEN t.tgtype IN (4, 16) THEN 'tide_new_rows' END
     AND t.tgoldtable IS NOT DISTINCT FROM CASE WHEN t.tgtype IN (8, 16) THEN 'tide_old_rows' END
$$;

-- Publishes the changes capture_trigger built (plain jsonb, made with the writer's rights) into the
-- outbox the capture was recorded for. Only while a trigger runs, and only for a trigger that
-- capture_table created and recorded; the outbox, topic and table names come from the catalog, not
-- from the caller. Nothing in here evaluates anything the caller defined.
--
-- The catalog is read in one statement of single-row lookups, no joins: this runs inside
-- capture_trigger, whose enable_nestloop = off would turn a join over pg_trigger or pg_class into a
-- hash join over the whole catalog, on every captured statement. The trigger check is
-- capture_trigger_op's, written out (a SQL function with SET is planned again on every call).
CREATE FUNCTION tide.capture_publish(p_table oid, p_trigger name, p_changes tide.capture_change[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_capture record;
  v_outbox tide.outboxes;
BEGIN
  SELECT c.outbox_name, c.operations[array_position(c.trigger_names, p_trigger::text)] AS op,
         (SELECT CASE t.tgtype WHEN 4 THEN 'insert' WHEN 8 THEN 'delete' WHEN 16 THEN 'update' END
            FROM pg_trigger t
           WHERE t.tgrelid = p_table AND t.tgname = p_trigger AND t.tgfoid = 'tide.capture_trigger()'::regprocedure
             AND t.tgnewtable IS NOT DISTINCT FROM CASE WHEN t.tgtype IN (4, 16) THEN 'tide_new_rows' END
             AND t.tgoldtable IS NOT DISTINCT FROM CASE WHEN t.tgtype IN (8, 16) THEN 'tide_old_rows' END) AS trigger_op,
         (SELECT r.relname FROM pg_class r WHERE r.oid = p_table) AS table_name,
         (SELECT n.nspname FROM pg_namespace n WHERE n.oid = (SELECT r.relnamespace FROM pg_class r WHERE r.oid = p_table))
           AS table_schema
    INTO v_capture
    FROM tide.captures c
   WHERE c.table_oid = p_table AND p_trigger = ANY (c.trigger_names);
  IF v_capture.op IS NULL OR v_capture.trigger_op IS DISTINCT FROM v_capture.op OR pg_trigger_depth() = 0 THEN
    RAISE EXCEPTION 'capture of %: trigger % is not a capture recorded by tide.capture_table', p_table::regclass,
      quote_ident(p_trigger) USING ERRCODE = 'object_not_in_prerequisite_state',
      HINT = 'its outbox may have been dropped; drop the trigger, or capture the table again with tide.capture_table';
  END IF;
  SELECT * INTO v_outbox FROM tide.outboxes WHERE name = v_capture.outbox_name;
  IF NOT v_outbox.enabled THEN
    RAISE EXCEPTION 'capture of %: outbox "%" is disabled', p_table::regclass, v_outbox.name
      USING ERRCODE = 'object_not_in_prerequisite_state', HINT = format('enable it with tide.outbox_enable(%L)', v_outbox.name);
  END IF;
  INSERT INTO tide.outbox_messages (outbox, topic, payload, headers)
  SELECT v_outbox.name, v_capture.table_schema || '.' || v_capture.table_name,
         jsonb_build_object('record', x.record, 'changes', x.changes, 'action', x.action),
         tide.capture_headers(x.action, v_capture.table_schema, v_capture.table_name, x.key)
    FROM unnest(p_changes) WITH ORDINALITY AS x(action, record, changes, key, ord)
   ORDER BY x.ord;
  IF v_outbox.notify THEN
    PERFORM pg_notify('tide_outbox_notify', v_outbox.name);
  END IF;
END $$;

-- Capture runs with the caller's own rights: capture_table and uncapture_table create and drop the
-- triggers as the caller (PostgreSQL lets only the table's owner do that), record them in
-- tide.captures under row-level security, and a backfill reads the table as the caller.

-- Starts capturing a table's changes into an outbox. The caller must own the table.
CREATE FUNCTION tide.capture_table(p_table regclass, p_outbox text,
                                   p_operations text[] DEFAULT ARRAY['insert', 'update', 'delete'])
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_operations text[];
  v_key text[];
  v_op text;
  v_names text[] := '{}';
BEGIN
  PERFORM tide.check_not_null('capture_table', 'p_table', p_table);
  PERFORM tide.check_not_null('capture_table', 'p_outbox', p_outbox);
  IF NOT EXISTS (SELECT 1 FROM tide.outboxes WHERE name = p_outbox) THEN
    RAISE EXCEPTION 'outbox "%" does not exist', p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  v_operations := tide.capture_operations(p_table, p_operations);
  v_key := tide.primary_key_columns(p_table);
  PERFORM tide.check_table_owner(p_table, 'capture it');
  -- Captures of one table run one at a time, so that a trigger name found free below stays free.
  EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', p_table);
  IF EXISTS (SELECT 1 FROM tide.captures WHERE table_oid = p_table AND outbox_name = p_outbox) THEN
    RAISE EXCEPTION 'table % is already captured into outbox "%"', p_table, p_outbox USING ERRCODE = 'duplicate_object';
  END IF;
  FOREACH v_op IN ARRAY v_operations LOOP
    v_names := v_names || tide.capture_trigger_name(p_table, p_outbox, v_op);
    EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s FOR EACH STATEMENT EXECUTE FUNCTION tide.capture_trigger(%L, %L)',
      v_names[cardinality(v_names)], upper(v_op), p_table,
      CASE v_op WHEN 'insert' THEN 'NEW TABLE AS tide_new_rows'
                WHEN 'delete' THEN 'OLD TABLE AS tide_old_rows'
                ELSE 'OLD TABLE AS tide_old_rows NEW TABLE AS tide_new_rows' END,
      p_outbox, v_key::text);
  END LOOP;
  PERFORM tide.capture_register(p_table, p_outbox, v_operations, v_names);
END $$;

-- A name for a new capture trigger that no trigger of the table has: "tide_capture_<op>_<outbox>",
-- cut to PostgreSQL's 63 characters, with "_2", "_3", ... when taken (two long outbox names with a
-- common prefix). The name is recorded, never derived again.
CREATE FUNCTION tide.capture_trigger_name(p_table regclass, p_outbox text, p_op text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_base text := 'tide_capture_' || p_op || '_' || p_outbox;
  v_name text := left(v_base, 63);
  v_n integer := 1;
BEGIN
  WHILE EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = p_table AND tgname = v_name) LOOP
    v_n := v_n + 1;
    v_name := left(v_base, 63 - length(v_n::text) - 1) || '_' || v_n;
  END LOOP;
  RETURN v_name;
END $$;

-- The recorded capture triggers of an outbox that still exist on a table, by name.
CREATE FUNCTION tide.capture_triggers(p_table regclass, p_outbox text) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT coalesce(array_agg(r.trigger_name ORDER BY r.trigger_name), '{}')
    FROM tide.captures c
    CROSS JOIN LATERAL unnest(c.operations, c.trigger_names) AS r(op, trigger_name)
   WHERE c.table_oid = p_table AND c.outbox_name = p_outbox
     AND tide.capture_trigger_op(p_table, r.trigger_name) = r.op
$$;

-- Records a capture whose triggers the caller has just created (capture_table does): refused unless
-- the caller owns the table and each named trigger is a capture trigger for its operation.
CREATE FUNCTION tide.capture_register(p_table regclass, p_outbox text, p_operations text[], p_trigger_names text[])
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_missing text;
BEGIN
  PERFORM tide.check_not_null('capture_register', 'p_table', p_table);
  PERFORM tide.check_not_null('capture_register', 'p_outbox', p_outbox);
  PERFORM tide.check_not_null('capture_register', 'p_trigger_names', p_trigger_names);
  IF tide.capture_operations(p_table, p_operations) <> p_operations THEN
    RAISE EXCEPTION 'capture of %: operations must be listed once each, in the order insert, update, delete (got %)',
      p_table, p_operations USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM tide.check_table_owner(p_table, 'capture it');
  SELECT string_agg(coalesce(quote_ident(r.trigger_name), 'NULL') || ' (' || r.op || ')', ', ') INTO v_missing
    FROM unnest(p_operations, p_trigger_names) AS r(op, trigger_name)
   WHERE tide.capture_trigger_op(p_table, r.trigger_name) IS DISTINCT FROM r.op;
  IF v_missing IS NOT NULL OR cardinality(p_trigger_names) <> cardinality(p_operations) THEN
    RAISE EXCEPTION 'capture of % into "%": its triggers do not exist (%); use tide.capture_table', p_table, p_outbox,
      coalesce(v_missing, 'one trigger name per operation is needed') USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  INSERT INTO tide.captures (table_oid, outbox_name, operations, trigger_names)
  VALUES (p_table, p_outbox, p_operations, p_trigger_names);
EXCEPTION WHEN unique_violation THEN
  RAISE EXCEPTION 'table % is already captured into outbox "%"', p_table, p_outbox USING ERRCODE = 'duplicate_object';
END $$;

-- Stops capturing. The caller must own the table.
CREATE FUNCTION tide.uncapture_table(p_table regclass, p_outbox text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_trigger text;
BEGIN
  PERFORM tide.check_not_null('uncapture_table', 'p_table', p_table);
  PERFORM tide.check_not_null('uncapture_table', 'p_outbox', p_outbox);
  IF NOT EXISTS (SELECT 1 FROM tide.captures WHERE table_oid = p_table AND outbox_name = p_outbox) THEN
    RAISE EXCEPTION 'table % is not captured into outbox "%"', p_table, p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  PERFORM tide.check_table_owner(p_table, 'uncapture it');
  FOREACH v_trigger IN ARRAY tide.capture_triggers(p_table, p_outbox) LOOP
    EXECUTE format('DROP TRIGGER %I ON %s', v_trigger, p_table);
  END LOOP;
  PERFORM tide.capture_unregister(p_table, p_outbox);
END $$;

-- Forgets a capture (and its backfill progress) once its triggers are gone. The caller must own the table.
CREATE FUNCTION tide.capture_unregister(p_table regclass, p_outbox text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_not_null('capture_unregister', 'p_table', p_table);
  PERFORM tide.check_not_null('capture_unregister', 'p_outbox', p_outbox);
  PERFORM tide.check_table_owner(p_table, 'uncapture it');
  IF cardinality(tide.capture_triggers(p_table, p_outbox)) > 0 THEN
    RAISE EXCEPTION 'capture of % into "%": its triggers still exist; use tide.uncapture_table', p_table, p_outbox
      USING ERRCODE = 'object_in_use';
  END IF;
  DELETE FROM tide.captures WHERE table_oid = p_table AND outbox_name = p_outbox;
  DELETE FROM tide.capture_backfills WHERE table_oid = p_table AND outbox_name = p_outbox;
END $$;

-- One backfill chunk: the next p_chunk rows after the saved key, read with the caller's rights and
-- published as "read" events, with the progress saved in the same transaction. Returns the rows
-- published (fewer than p_chunk: finished). The caller must own the table.
CREATE FUNCTION tide.capture_backfill_chunk(p_table regclass, p_outbox text, p_chunk integer DEFAULT 1000)
RETURNS integer LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_key text[];
  v_last jsonb;
  v_rows jsonb;
BEGIN
  PERFORM tide.check_not_null('capture_backfill_chunk', 'p_table', p_table);
  PERFORM tide.check_not_null('capture_backfill_chunk', 'p_outbox', p_outbox);
  PERFORM tide.check_backfill_chunk(p_chunk);
  IF NOT EXISTS (SELECT 1 FROM tide.outboxes WHERE name = p_outbox) THEN
    RAISE EXCEPTION 'outbox "%" does not exist', p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  PERFORM tide.check_table_owner(p_table, 'backfill it');
  v_key := tide.primary_key_columns(p_table);
  SELECT last_key INTO v_last FROM tide.capture_backfills WHERE table_oid = p_table AND outbox_name = p_outbox;
  EXECUTE format($q$
    SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY %2$s), '[]') FROM (
      SELECT * FROM %1$s t
       WHERE $1 IS NULL OR (%2$s) > (SELECT %3$s FROM jsonb_populate_record(NULL::%1$s, $1) k)
       ORDER BY %2$s LIMIT $2) t
  $q$, p_table, (SELECT string_agg(format('t.%I', c), ', ') FROM unnest(v_key) c),
       (SELECT string_agg(format('k.%I', c), ', ') FROM unnest(v_key) c))
  INTO v_rows USING v_last, p_chunk;
  RETURN tide.capture_backfill_publish(p_table, p_outbox, v_rows, p_chunk);
END $$;

CREATE FUNCTION tide.check_backfill_chunk(p_chunk integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF p_chunk IS NULL OR p_chunk < 1 THEN
    RAISE EXCEPTION 'capture_backfill: chunk must be at least 1 (got %)', coalesce(p_chunk::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
END $$;

-- Publishes a chunk of rows (a JSON array in key order, from capture_backfill_chunk) as "read"
-- events and moves the table's backfill progress past the last one; a chunk shorter than p_chunk
-- finishes the backfill. The caller must own the table.
CREATE FUNCTION tide.capture_backfill_publish(p_table regclass, p_outbox text, p_rows jsonb, p_chunk integer)
RETURNS integer LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_count integer;
BEGIN
  PERFORM tide.check_not_null('capture_backfill_publish', 'p_table', p_table);
  PERFORM tide.check_not_null('capture_backfill_publish', 'p_outbox', p_outbox);
  PERFORM tide.check_not_null('capture_backfill_publish', 'p_rows', p_rows);
  PERFORM tide.check_backfill_chunk(p_chunk);
  IF jsonb_typeof(p_rows) <> 'array' THEN
    RAISE EXCEPTION 'capture of %: rows must be a JSON array (got %)', p_table, jsonb_typeof(p_rows)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM tide.check_table_owner(p_table, 'backfill it');
  v_count := jsonb_array_length(p_rows);
  INSERT INTO tide.capture_backfills AS b (table_oid, outbox_name, last_key, rows_done, finished_at)
  VALUES (p_table, p_outbox, CASE WHEN v_count > 0 THEN tide.row_key(p_rows -> -1, tide.primary_key_columns(p_table)) END, v_count,
          CASE WHEN v_count < p_chunk THEN now() END)
  ON CONFLICT (table_oid, outbox_name) DO UPDATE
     SET last_key = coalesce(excluded.last_key, b.last_key), rows_done = b.rows_done + excluded.rows_done,
         finished_at = excluded.finished_at;
  PERFORM tide.capture_publish_reads(p_table, p_outbox, p_rows);
  RETURN v_count;
END $$;

-- Writes rows as "read" events of a table into an outbox: the topic, headers and key come from the
-- catalog, the rows are plain jsonb. No more than a tide_publisher can do with outbox_publish; the
-- ownership check and the progress live in capture_backfill_publish, which runs as the caller.
CREATE FUNCTION tide.capture_publish_reads(p_table regclass, p_outbox text, p_rows jsonb) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_outbox tide.outboxes;
  v_key text[];
  v_schema text;
  v_name text;
BEGIN
  PERFORM tide.check_not_null('capture_publish_reads', 'p_table', p_table);
  PERFORM tide.check_not_null('capture_publish_reads', 'p_outbox', p_outbox);
  PERFORM tide.check_not_null('capture_publish_reads', 'p_rows', p_rows);
  SELECT * INTO v_outbox FROM tide.outboxes WHERE name = p_outbox AND enabled;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'outbox "%" does not exist or is disabled', p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  v_key := tide.primary_key_columns(p_table);
  SELECT n.nspname, c.relname INTO v_schema, v_name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE c.oid = p_table;
  INSERT INTO tide.outbox_messages (outbox, topic, payload, headers)
  SELECT p_outbox, v_schema || '.' || v_name, jsonb_build_object('record', r.j, 'changes', NULL, 'action', 'read'),
         tide.capture_headers('read', v_schema, v_name, tide.row_key(r.j, v_key))
    FROM jsonb_array_elements(p_rows) WITH ORDINALITY AS r(j, n)
   ORDER BY r.n;
  IF v_outbox.notify THEN
    PERFORM pg_notify('tide_outbox_notify', p_outbox);
  END IF;
END $$;

-- Forgets a table's backfill progress, so the next backfill starts from the first row. The caller
-- must own the table.
CREATE FUNCTION tide.capture_backfill_reset(p_table regclass, p_outbox text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_not_null('capture_backfill_reset', 'p_table', p_table);
  PERFORM tide.check_not_null('capture_backfill_reset', 'p_outbox', p_outbox);
  PERFORM tide.check_table_owner(p_table, 'backfill it');
  DELETE FROM tide.capture_backfills WHERE table_oid = p_table AND outbox_name = p_outbox;
END $$;

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
  PERFORM tide.check_not_null('capture_backfill', 'p_table', p_table);
  PERFORM tide.check_not_null('capture_backfill', 'p_outbox', p_outbox);
  PERFORM tide.check_not_null('capture_backfill', 'p_restart', p_restart);
  PERFORM tide.check_backfill_chunk(p_chunk);
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
-- Written with the caller's rights by the functions above, and only for tables the caller owns (row-level security).
GRANT INSERT, DELETE ON tide.captures TO tide_publisher, tide_relay;
GRANT INSERT, UPDATE, DELETE ON tide.capture_backfills TO tide_publisher, tide_relay;
-- capture_table checks the outbox exists as the caller.
GRANT SELECT ON tide.outboxes TO tide_publisher;
-- Creating a trigger needs EXECUTE on its function (firing it does not): table owners get it via
-- tide_publisher. Every role that writes to a captured table needs capture_publish, so tide_publisher.
GRANT EXECUTE ON FUNCTION tide.capture_trigger() TO tide_publisher, tide_relay;
GRANT EXECUTE ON FUNCTION tide.check_not_null(text, text, anyelement), tide.check_table_owner(regclass, text),
  tide.capture_operations(regclass, text[]), tide.capture_trigger_op(oid, name), tide.check_backfill_chunk(integer),
  tide.capture_table(regclass, text, text[]), tide.uncapture_table(regclass, text),
  tide.capture_backfill_chunk(regclass, text, integer), tide.primary_key_columns(regclass),
  tide.capture_trigger_name(regclass, text, text), tide.capture_triggers(regclass, text),
  tide.capture_register(regclass, text, text[], text[]), tide.capture_unregister(regclass, text),
  tide.capture_backfill_publish(regclass, text, jsonb, integer), tide.capture_backfill_reset(regclass, text),
  tide.capture_publish(oid, name, tide.capture_change[]), tide.capture_publish_reads(regclass, text, jsonb),
  tide.row_key(jsonb, text[]), tide.capture_headers(text, text, text, jsonb)
  TO tide_publisher, tide_relay;
GRANT EXECUTE ON PROCEDURE tide.capture_backfill(regclass, text, integer, boolean) TO tide_publisher, tide_relay;
