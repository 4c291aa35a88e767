-- 012: table capture from the write-ahead log. tide.capture_table(..., p_mode := 'wal') records the
-- table in tide.wal_captures, creates a logical replication slot (pgoutput) and a publication of the
-- table, both named tide_wal_<table>_<table oid>_<8 hex digits of md5(outbox)>, and sets the table's
-- REPLICA IDENTITY to FULL (restored by uncapture_table), so that updates and deletes carry the whole
-- old row: the messages have exactly the shape trigger capture gives them (007), and an unchanged
-- TOASTed column of an update is taken from the old row.
--
-- The relay reads the slot (core/capture/wal_capture.ts), hands each source transaction's changes as column
-- text to tide.wal_capture_write, which builds the rows with the column types (text input, then
-- to_jsonb: the same conversion the trigger makes) and writes them into the outbox through the narrow
-- SECURITY DEFINER tide.wal_capture_publish; only after that transaction committed does it confirm
-- the slot's position.
--
-- Rights. Creating a slot needs the REPLICATION attribute (or superuser): tide.wal_slot_create and
-- tide.wal_slot_drop are SECURITY DEFINER and run as the schema owner, who must have it (the role
-- that ran pg-tide install). They touch only slots named tide_wal_% that tide recorded. The relay's
-- role reads the slot over a replication connection, so it needs REPLICATION too. The publication
-- and the replica identity are changed as the caller, who must own the table (PostgreSQL's rule) and
-- have CREATE on the database.

CREATE TABLE tide.wal_captures (
  table_oid     oid NOT NULL,
  -- No cascade: dropping the outbox would leave a slot that holds WAL forever. Uncapture first.
  outbox_name   text NOT NULL REFERENCES tide.outboxes (name),
  operations    text[] NOT NULL
                CHECK (cardinality(operations) > 0 AND operations <@ ARRAY['insert', 'update', 'delete', 'truncate']),
  -- The slot's name, also the publication's. Recorded, never derived again.
  slot_name     text NOT NULL UNIQUE,
  -- pg_class.relreplident before capture_table set FULL; uncapture_table puts it back.
  previous_replica_identity text NOT NULL,
  -- The relay warns when the slot's unconfirmed WAL exceeds this many bytes.
  lag_warn_bytes bigint NOT NULL DEFAULT 1073741824 CHECK (lag_warn_bytes > 0),
  -- The last time a relay confirmed a position of the slot (at most every few seconds).
  confirmed_at  timestamptz,
  created_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (table_oid, outbox_name)
);

ALTER TABLE tide.wal_captures ENABLE ROW LEVEL SECURITY;
CREATE POLICY wal_captures_read ON tide.wal_captures FOR SELECT USING (true);
CREATE POLICY wal_captures_table_owner ON tide.wal_captures FOR ALL
  USING (pg_catalog.pg_has_role(CURRENT_USER, (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = table_oid), 'USAGE'))
  WITH CHECK (pg_catalog.pg_has_role(CURRENT_USER, (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = table_oid), 'USAGE'));

-- The trigger versions of 007 stay, under new names; capture_table and uncapture_table choose.
ALTER FUNCTION tide.capture_table(regclass, text, text[]) RENAME TO capture_table_trigger;
ALTER FUNCTION tide.uncapture_table(regclass, text) RENAME TO uncapture_table_trigger;

-- Creates a logical replication slot for tide.capture_table. Must run before the calling transaction
-- writes anything (PostgreSQL's rule for creating a slot).
-- The slot and publication name of a WAL capture of p_table into p_outbox.
CREATE FUNCTION tide.wal_slot_name(p_table regclass, p_outbox text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT 'tide_wal_' || left(regexp_replace(lower(c.relname), '[^a-z0-9_]', '_', 'g'), 30) || '_' || c.oid
         || '_' || left(md5(p_outbox), 8)
    FROM pg_class c WHERE c.oid = p_table
$$;

-- Creates the slot of a WAL capture of p_table into p_outbox, for capture_table. A slot holds WAL
-- until it is dropped, so only a session whose login role owns the table (or is a member of its
-- owner) may have one created, and only for an outbox that exists: a role that may merely publish
-- cannot pin the server's WAL. (Inside this function current_user is the schema owner; the caller
-- is session_user.)
CREATE FUNCTION tide.wal_slot_create(p_table regclass, p_outbox text) RETURNS pg_lsn
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_lsn pg_lsn;
  v_slot text;
BEGIN
  PERFORM tide.check_not_null('wal_slot_create', 'p_table', p_table);
  PERFORM tide.check_not_null('wal_slot_create', 'p_outbox', p_outbox);
  IF NOT pg_has_role(session_user, (SELECT relowner FROM pg_class WHERE oid = p_table), 'MEMBER') THEN
    RAISE EXCEPTION 'capture of % from the WAL: only the table''s owner can capture it (you are %)', p_table, session_user
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM tide.outboxes WHERE name = p_outbox) THEN
    RAISE EXCEPTION 'outbox "%" does not exist', p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  v_slot := tide.wal_slot_name(p_table, p_outbox);
  IF NOT (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user) THEN
    RAISE EXCEPTION 'capture from the WAL: the tide schema''s owner (%) may not create replication slots', current_user
      USING ERRCODE = 'insufficient_privilege', HINT = format('ALTER ROLE %I REPLICATION', current_user);
  END IF;
  SELECT lsn INTO v_lsn FROM pg_create_logical_replication_slot(v_slot, 'pgoutput');
  RETURN v_lsn;
EXCEPTION WHEN object_not_in_prerequisite_state THEN
  RAISE EXCEPTION 'capture from the WAL: cannot create the replication slot (%)', SQLERRM
    USING ERRCODE = 'object_not_in_prerequisite_state',
          HINT = 'call tide.capture_table(..., p_mode => ''wal'') in a transaction of its own, before any write';
END $$;

-- Drops a slot tide created, ending the relay's replication session on it first. Only slots of a
-- capture the caller is removing: a slot of a recorded capture, or an orphan (a tide_wal_ slot no
-- capture records any more: uncapture_table forgets the capture first).
CREATE FUNCTION tide.wal_slot_drop(p_slot text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_pid integer;
  v_deadline timestamptz := clock_timestamp() + interval '10 seconds';
BEGIN
  IF p_slot IS NULL OR p_slot !~ '^tide_wal_[a-z0-9_]+$' THEN
    RAISE EXCEPTION 'wal_slot_drop: "%" is not a tide slot name', p_slot USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF EXISTS (SELECT 1 FROM tide.wal_captures WHERE slot_name = p_slot) THEN
    RAISE EXCEPTION 'replication slot % belongs to a capture; use tide.uncapture_table', p_slot USING ERRCODE = 'object_in_use';
  END IF;
  -- The slot of a table that still exists may be dropped only by its owner (session_user: the caller).
  IF EXISTS (SELECT 1 FROM pg_class c
              WHERE c.oid = substring(p_slot FROM '_([0-9]+)_[0-9a-f]{8}$')::oid
                AND NOT pg_has_role(session_user, c.relowner, 'MEMBER')) THEN
    RAISE EXCEPTION 'replication slot %: only the captured table''s owner can drop it (you are %)', p_slot, session_user
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  LOOP
    SELECT active_pid INTO v_pid FROM pg_replication_slots WHERE slot_name = p_slot AND database = current_database();
    IF NOT FOUND THEN
      RETURN;
    END IF;
    IF v_pid IS NULL THEN
      BEGIN
        PERFORM pg_drop_replication_slot(p_slot);
        RETURN;
      EXCEPTION WHEN object_in_use OR undefined_object THEN
        NULL; -- a relay took it up again, or it is gone: look again
      END;
    ELSE
      PERFORM pg_terminate_backend(v_pid);
    END IF;
    IF clock_timestamp() > v_deadline THEN
      RAISE EXCEPTION 'replication slot % is still in use by process %', p_slot, v_pid USING ERRCODE = 'object_in_use';
    END IF;
    PERFORM pg_sleep(0.05);
  END LOOP;
END $$;

-- Drops the inactive tide_wal_ slots of this database that no capture records (a capture_table whose
-- transaction was rolled back after it created its slot leaves one). Returns their names.
CREATE FUNCTION tide.wal_drop_orphan_slots() RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_slot text;
BEGIN
  FOR v_slot IN
    SELECT s.slot_name FROM pg_replication_slots s
     WHERE s.database = current_database() AND s.slot_name ~ '^tide_wal_' AND NOT s.active
       AND NOT EXISTS (SELECT 1 FROM tide.wal_captures w WHERE w.slot_name = s.slot_name)
  LOOP
    PERFORM pg_drop_replication_slot(v_slot);
    RETURN NEXT v_slot;
  END LOOP;
END $$;

-- Starts capturing a table's changes into an outbox: with triggers (p_mode 'trigger', the default:
-- tide.capture_table_trigger) or from the WAL ('wal'). The caller must own the table.
CREATE FUNCTION tide.capture_table(p_table regclass, p_outbox text,
                                   p_operations text[] DEFAULT ARRAY['insert', 'update', 'delete'],
                                   p_mode text DEFAULT 'trigger')
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_operations text[];
  v_slot text;
  v_identity text;
BEGIN
  PERFORM tide.check_not_null('capture_table', 'p_table', p_table);
  PERFORM tide.check_not_null('capture_table', 'p_outbox', p_outbox);
  PERFORM tide.check_not_null('capture_table', 'p_mode', p_mode);
  IF p_mode = 'trigger' THEN
    IF EXISTS (SELECT 1 FROM tide.wal_captures WHERE table_oid = p_table AND outbox_name = p_outbox) THEN
      RAISE EXCEPTION 'table % is already captured into outbox "%" (from the WAL)', p_table, p_outbox USING ERRCODE = 'duplicate_object';
    END IF;
    PERFORM tide.capture_table_trigger(p_table, p_outbox, p_operations);
    RETURN;
  ELSIF p_mode <> 'wal' THEN
    RAISE EXCEPTION 'capture_table: p_mode must be ''trigger'' or ''wal'' (got "%")', p_mode USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM tide.outboxes WHERE name = p_outbox) THEN
    RAISE EXCEPTION 'outbox "%" does not exist', p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  IF p_operations IS NULL OR cardinality(p_operations) = 0
     OR NOT p_operations <@ ARRAY['insert', 'update', 'delete', 'truncate'] THEN
    RAISE EXCEPTION 'capture of %: operations must be some of insert, update, delete, truncate (got %)', p_table,
      coalesce(p_operations::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT array_agg(op ORDER BY n) INTO v_operations
    FROM unnest(ARRAY['insert', 'update', 'delete', 'truncate']) WITH ORDINALITY AS o(op, n) WHERE op = ANY (p_operations);
  PERFORM tide.primary_key_columns(p_table);
  PERFORM tide.check_table_owner(p_table, 'capture it');
  IF current_setting('wal_level') <> 'logical' THEN
    RAISE EXCEPTION 'capture of % from the WAL needs wal_level = logical (the server has %)', p_table, current_setting('wal_level')
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'run ALTER SYSTEM SET wal_level = logical (as a superuser) and restart PostgreSQL, or use p_mode => ''trigger''';
  END IF;
  IF EXISTS (SELECT 1 FROM tide.wal_captures WHERE table_oid = p_table AND outbox_name = p_outbox)
     OR EXISTS (SELECT 1 FROM tide.captures WHERE table_oid = p_table AND outbox_name = p_outbox) THEN
    RAISE EXCEPTION 'table % is already captured into outbox "%"', p_table, p_outbox USING ERRCODE = 'duplicate_object';
  END IF;
  SELECT tide.wal_slot_name(p_table, p_outbox), c.relreplident::text INTO v_slot, v_identity FROM pg_class c WHERE c.oid = p_table;
  -- The slot first: PostgreSQL creates one only in a transaction that has not written yet. Changes
  -- that commit before this transaction does are not in the publication yet, so not captured.
  PERFORM tide.wal_slot_create(p_table, p_outbox);
  BEGIN
    EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', p_table);
    -- Stored generated columns are in a trigger's row too; PostgreSQL 18 can publish them.
    EXECUTE format('CREATE PUBLICATION %I FOR TABLE %s WITH (publish = %L%s)', v_slot, p_table, array_to_string(v_operations, ', '),
      CASE WHEN current_setting('server_version_num')::integer >= 180000 THEN ', publish_generated_columns = stored' ELSE '' END);
    INSERT INTO tide.wal_captures (table_oid, outbox_name, operations, slot_name, previous_replica_identity)
    VALUES (p_table, p_outbox, v_operations, v_slot, v_identity);
  EXCEPTION WHEN OTHERS THEN
    PERFORM tide.wal_slot_drop(v_slot); -- a slot is not transactional: it would outlive the rollback
    RAISE;
  END;
END $$;

-- Stops capturing (either mode). For WAL capture: drops the slot and the publication and puts the
-- table's replica identity back. The caller must own the table.
CREATE FUNCTION tide.uncapture_table(p_table regclass, p_outbox text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_capture tide.wal_captures;
BEGIN
  PERFORM tide.check_not_null('uncapture_table', 'p_table', p_table);
  PERFORM tide.check_not_null('uncapture_table', 'p_outbox', p_outbox);
  SELECT * INTO v_capture FROM tide.wal_captures WHERE table_oid = p_table AND outbox_name = p_outbox;
  IF NOT FOUND THEN
    PERFORM tide.uncapture_table_trigger(p_table, p_outbox);
    RETURN;
  END IF;
  PERFORM tide.check_table_owner(p_table, 'uncapture it');
  DELETE FROM tide.wal_captures WHERE table_oid = p_table AND outbox_name = p_outbox;
  EXECUTE format('DROP PUBLICATION IF EXISTS %I', v_capture.slot_name);
  IF NOT EXISTS (SELECT 1 FROM tide.wal_captures WHERE table_oid = p_table) THEN
    EXECUTE format('ALTER TABLE %s REPLICA IDENTITY %s', p_table,
      CASE v_capture.previous_replica_identity WHEN 'n' THEN 'NOTHING' WHEN 'f' THEN 'FULL'
        WHEN 'i' THEN coalesce((SELECT 'USING INDEX ' || quote_ident(ic.relname) FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                                 WHERE i.indrelid = p_table AND i.indisreplident), 'DEFAULT')
        ELSE 'DEFAULT' END);
  END IF;
  -- Last: dropping a slot cannot be rolled back.
  PERFORM tide.wal_slot_drop(v_capture.slot_name);
  DELETE FROM tide.capture_backfills WHERE table_oid = p_table AND outbox_name = p_outbox;
END $$;

-- Builds the captured changes of one chunk of a source transaction from column text, with the rights
-- of the caller (the relay): every value goes through its column type's input function and to_jsonb,
-- as in trigger capture, so numbers, arrays and json keep every digit and byte. p_columns: the
-- relation's columns as pgoutput sent them, [[name, type oid, type modifier], ...]; p_rows:
-- [{"op": "insert"|"update"|"delete"|"truncate", "new": [text|null, ...], "old": [...] | null,
-- "missing": [names of columns whose value was not sent]}, ...]. Writes them into the capture's
-- outbox (tide.wal_capture_publish) and returns how many messages were written.
CREATE FUNCTION tide.wal_capture_write(p_slot text, p_columns jsonb, p_rows jsonb) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_table oid;
  v_select text;
  v_key text[];
  v_changes tide.capture_change[];
BEGIN
  SELECT table_oid INTO v_table FROM tide.wal_captures WHERE slot_name = p_slot;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'wal_capture_write: slot "%" belongs to no capture', p_slot USING ERRCODE = 'undefined_object';
  END IF;
  v_key := tide.primary_key_columns(v_table);
  IF jsonb_array_length(p_columns) > 0 THEN
    SELECT string_agg(format('(v ->> %s)::%s AS %I', c.n - 1, format_type((c.col ->> 1)::oid, (c.col ->> 2)::integer), c.col ->> 0),
                      ', ' ORDER BY c.n)
      INTO v_select FROM jsonb_array_elements(p_columns) WITH ORDINALITY AS c(col, n);
  END IF;
  EXECUTE format($q$
    WITH r AS (
      SELECT e.n, e.r ->> 'op' AS op,
             CASE WHEN jsonb_typeof(e.r -> 'new') = 'array' THEN (SELECT to_jsonb(x) FROM (SELECT %1$s FROM (SELECT e.r -> 'new' AS v) v) x) - coalesce(ARRAY(SELECT jsonb_array_elements_text(e.r -> 'missing')), '{}') END AS nj,
             CASE WHEN jsonb_typeof(e.r -> 'old') = 'array' THEN (SELECT to_jsonb(x) FROM (SELECT %1$s FROM (SELECT e.r -> 'old' AS v) v) x) END AS oj
        FROM jsonb_array_elements($1) WITH ORDINALITY AS e(r, n)),
    k AS (
      SELECT r.*, tide.row_key(r.nj, $2) AS nk, tide.row_key(r.oj, $2) AS ok FROM r)
    SELECT array_agg(c.change ORDER BY k.n, c.sub)
      FROM k CROSS JOIN LATERAL (
        -- An update that changed the key is a delete of the old key and an insert of the new one, as in trigger capture.
        SELECT 1 AS sub, ROW('delete', k.oj, NULL, k.ok)::tide.capture_change AS change
         WHERE k.op = 'delete' OR (k.op = 'update' AND k.oj IS NOT NULL AND k.ok IS DISTINCT FROM k.nk)
        UNION ALL
        SELECT 2, ROW(CASE WHEN k.op = 'update' AND k.oj IS NOT NULL AND k.ok IS DISTINCT FROM k.nk THEN 'insert' ELSE k.op END,
                      k.nj,
                      CASE WHEN k.op = 'update' AND k.oj IS NOT NULL AND k.ok IS NOT DISTINCT FROM k.nk THEN
                        coalesce((SELECT jsonb_object_agg(o.key, o.value) FROM jsonb_each(k.oj) o
                                   WHERE k.nj -> o.key IS DISTINCT FROM o.value AND k.nj ? o.key), '{}') END,
                      k.nk)::tide.capture_change
         WHERE k.op IN ('insert', 'update')
        UNION ALL
        SELECT 3, ROW('truncate', NULL, NULL, NULL)::tide.capture_change WHERE k.op = 'truncate') c
  $q$, coalesce(v_select, 'NULL::int AS "?"')) INTO v_changes USING p_rows, v_key;
  IF cardinality(v_changes) > 0 THEN
    PERFORM tide.wal_capture_publish(p_slot, v_changes);
  END IF;
  RETURN coalesce(cardinality(v_changes), 0);
END $$;

-- Writes captured changes (plain jsonb, built by wal_capture_write) into the outbox of the capture
-- that owns the slot; the outbox, topic and table names come from the catalog. Granted to tide_relay.
CREATE FUNCTION tide.wal_capture_publish(p_slot text, p_changes tide.capture_change[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_capture record;
BEGIN
  SELECT w.outbox_name, o.enabled, o.notify, n.nspname AS table_schema, c.relname AS table_name INTO v_capture
    FROM tide.wal_captures w
    JOIN tide.outboxes o ON o.name = w.outbox_name
    JOIN pg_class c ON c.oid = w.table_oid
    JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE w.slot_name = p_slot;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'wal_capture_publish: slot "%" belongs to no capture', p_slot USING ERRCODE = 'undefined_object';
  END IF;
  IF NOT v_capture.enabled THEN
    RAISE EXCEPTION 'capture into outbox "%": the outbox is disabled', v_capture.outbox_name
      USING ERRCODE = 'object_not_in_prerequisite_state', HINT = format('enable it with tide.outbox_enable(%L)', v_capture.outbox_name);
  END IF;
  INSERT INTO tide.outbox_messages (outbox, topic, payload, headers)
  SELECT v_capture.outbox_name, v_capture.table_schema || '.' || v_capture.table_name,
         jsonb_build_object('record', x.record, 'changes', x.changes, 'action', x.action),
         tide.capture_headers(x.action, v_capture.table_schema, v_capture.table_name, x.key)
    FROM unnest(p_changes) WITH ORDINALITY AS x(action, record, changes, key, ord)
   ORDER BY x.ord;
  IF v_capture.notify THEN
    PERFORM pg_notify('tide_outbox_notify', v_capture.outbox_name);
  END IF;
END $$;

-- Notes that a relay confirmed a position of the slot (for the age in wal_capture_status).
CREATE FUNCTION tide.wal_capture_confirmed(p_slot text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  UPDATE tide.wal_captures SET confirmed_at = now() WHERE slot_name = p_slot
$$;

-- One row per WAL capture: its slot's health. lag_bytes: WAL written since the position the relay
-- last confirmed (what the slot keeps the server from recycling, at most); confirmed_age: since the
-- relay last confirmed; over_limit: lag_bytes above lag_warn_bytes.
CREATE VIEW tide.wal_capture_status AS
SELECT w.table_oid::regclass::text AS table_name, w.outbox_name, w.slot_name, w.operations,
       s.slot_name IS NOT NULL AS slot_exists, coalesce(s.active, false) AS active, s.active_pid,
       s.confirmed_flush_lsn,
       CASE WHEN s.slot_name IS NOT NULL THEN greatest(0, pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn))::bigint END AS lag_bytes,
       CASE WHEN s.slot_name IS NOT NULL THEN greatest(0, pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn))::bigint END AS retained_bytes,
       s.wal_status, now() - coalesce(w.confirmed_at, w.created_at) AS confirmed_age, w.lag_warn_bytes,
       coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn) > w.lag_warn_bytes, false) AS over_limit
  FROM tide.wal_captures w
  LEFT JOIN pg_replication_slots s ON s.slot_name = w.slot_name AND s.database = current_database();

-- Sets the lag at which the relay warns about a capture's slot. The caller must own the table.
CREATE FUNCTION tide.wal_capture_set_limit(p_table regclass, p_outbox text, p_lag_warn_bytes bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_table_owner(p_table, 'configure its capture');
  UPDATE tide.wal_captures SET lag_warn_bytes = p_lag_warn_bytes WHERE table_oid = p_table AND outbox_name = p_outbox;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'table % is not captured from the WAL into outbox "%"', p_table, p_outbox USING ERRCODE = 'undefined_object';
  END IF;
END $$;

REVOKE EXECUTE ON FUNCTION tide.wal_slot_create(regclass, text), tide.wal_slot_drop(text), tide.wal_drop_orphan_slots(),
  tide.capture_table(regclass, text, text[], text), tide.uncapture_table(regclass, text),
  tide.wal_capture_write(text, jsonb, jsonb), tide.wal_capture_publish(text, tide.capture_change[]),
  tide.wal_capture_confirmed(text), tide.wal_capture_set_limit(regclass, text, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION tide.wal_slot_name(regclass, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tide.wal_slot_name(regclass, text) TO tide_publisher, tide_relay, tide_reader;
REVOKE ALL ON tide.wal_captures, tide.wal_capture_status FROM PUBLIC;

GRANT SELECT ON tide.wal_captures, tide.wal_capture_status TO tide_reader, tide_relay, tide_publisher;
GRANT INSERT, DELETE, UPDATE (lag_warn_bytes) ON tide.wal_captures TO tide_publisher, tide_relay;
GRANT EXECUTE ON FUNCTION tide.capture_table(regclass, text, text[], text), tide.uncapture_table(regclass, text),
  tide.wal_slot_create(regclass, text), tide.wal_slot_drop(text), tide.wal_capture_set_limit(regclass, text, bigint)
  TO tide_publisher, tide_relay;
GRANT EXECUTE ON FUNCTION tide.wal_capture_write(text, jsonb, jsonb), tide.wal_capture_publish(text, tide.capture_change[]),
  tide.wal_capture_confirmed(text), tide.primary_key_columns(regclass), tide.row_key(jsonb, text[])
  TO tide_relay;
