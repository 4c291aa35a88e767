-- 004: the pipeline catalog. Forward pipelines read an outbox through a consumer group into a sink;
-- reverse pipelines read a source into an inbox. Every change sends NOTIFY tide_relay_config so
-- running relays pick it up without a restart.

CREATE TABLE tide.relay_pipelines (
  name           text PRIMARY KEY,
  direction      text NOT NULL CHECK (direction IN ('forward', 'reverse')),
  outbox_name    text REFERENCES tide.outboxes (name),
  consumer_group text,
  inbox_name     text REFERENCES tide.inboxes (name),
  plugin_type    text NOT NULL,
  config         jsonb NOT NULL,
  batch_size     integer NOT NULL DEFAULT 100 CHECK (batch_size BETWEEN 1 AND 100000),
  enabled        boolean NOT NULL DEFAULT true,
  idempotent     boolean NOT NULL DEFAULT true,
  -- Bumped by every call that changes the row (relay_set_outbox/inbox, relay_enable/disable); the
  -- owning relay records the version it runs in relay_pipeline_state (see relay_wait_applied).
  config_version bigint NOT NULL DEFAULT 1,
  created_at     timestamptz NOT NULL DEFAULT now(),
  updated_at     timestamptz NOT NULL DEFAULT now(),
  CHECK ((direction = 'forward' AND outbox_name IS NOT NULL AND consumer_group IS NOT NULL AND inbox_name IS NULL)
      OR (direction = 'reverse' AND inbox_name IS NOT NULL AND outbox_name IS NULL))
);
CREATE UNIQUE INDEX relay_pipelines_group ON tide.relay_pipelines (outbox_name, consumer_group);

-- What a relay is doing with a pipeline right now; written by the owning relay.
CREATE TABLE tide.relay_pipeline_state (
  pipeline       text NOT NULL REFERENCES tide.relay_pipelines (name) ON DELETE CASCADE,
  relay_group_id text NOT NULL DEFAULT 'default',
  owner_id       text,
  acquired_at    timestamptz,
  heartbeat_at   timestamptz,
  healthy        boolean NOT NULL DEFAULT true,
  last_error     text,
  last_error_at  timestamptz,
  -- The last time the worker connected or delivered a batch; an error older than this is past.
  last_success_at timestamptz,
  retry_attempt  integer NOT NULL DEFAULT 0,
  -- The relay_pipelines.config_version the owner's worker was started with.
  config_version bigint,
  -- closed: delivering; open: paused after repeated failures; half-open: one probe attempt.
  circuit        text NOT NULL DEFAULT 'closed' CHECK (circuit IN ('closed', 'open', 'half-open')),
  PRIMARY KEY (pipeline, relay_group_id)
);

-- Secrets never leave through the API: values under secret-looking keys, and in every string the
-- credential shapes of core/redact.ts (URL passwords and tokens, secret query parameters, password=
-- pairs, JSON pairs under secret keys, Authorization/Cookie header lines, Bearer/Basic credentials).
CREATE FUNCTION tide.redact(p_value jsonb, p_all boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  -- The same key pattern and text rules, in the same order, as core/redact.ts.
  c_secret_key CONSTANT text := 'password|passwd|passphrase|secret|token|api[_-]?key|credential|private[_-]?key|authorization|signing[_-]?key|cookie';
  c_scheme CONSTANT text := '[a-z][a-z0-9+.-]{0,31}://';
  c_url_password CONSTANT text := '(' || c_scheme || '[^\s:@/?#"]*:)[^\s/?#"]*@';
  c_url_token CONSTANT text := '(' || c_scheme || ')[^\s:/?#"]+@';
  -- ?name=value with a secret name: the key pattern or "signature" inside it, or exactly key / sig.
  c_query_secret CONSTANT text :=
    '([?&](?:[^\s=&#"?]{0,100}(?:' || c_secret_key || '|signature)[^\s=&#"?]{0,100}|key|sig)=)[^\s&#"]+';
  c_keyword_password CONSTANT text := '(\m[a-z_]*(?:password|passwd)\s*=\s*)(?:''(?:[^''\\]|\\.)*''?|[^\s&''";]+)';
  c_json_secret CONSTANT text :=
    '("[^"\\]{0,100}(?:' || c_secret_key || ')[^"\\]{0,100}"\s*:\s*\[?\s*")(?:[^"\\]|\\.)*"?';
  c_header_secret CONSTANT text :=
    '(\y(?:proxy-authorization|authorization|set-cookie|cookie|x-api-key|x-auth-token)[ \t]*:[ \t]*)[^\r\n"\\]+';
  c_auth_scheme CONSTANT text := '(\y(?:bearer|basic)[ \t]+)[a-z0-9._~+/-]+=*';
  v_text text;
BEGIN
  CASE jsonb_typeof(p_value)
    WHEN 'object' THEN
      RETURN coalesce((
        SELECT jsonb_object_agg(key, tide.redact(value, p_all OR key ~* c_secret_key))
          FROM jsonb_each(p_value)), '{}');
    WHEN 'array' THEN
      RETURN coalesce((
        SELECT jsonb_agg(tide.redact(value, p_all) ORDER BY ord)
          FROM jsonb_array_elements(p_value) WITH ORDINALITY AS e(value, ord)), '[]');
    WHEN 'string' THEN
      -- A PEM private key (ssl.key, tls.key) is a secret whatever its key is called.
      IF p_all OR (p_value #>> '{}') ~ '-----BEGIN [A-Z ]*PRIVATE KEY-----' THEN
        RETURN '"***"';
      END IF;
      v_text := p_value #>> '{}';
      v_text := regexp_replace(v_text, c_url_password, '\1***@', 'gi');
      v_text := regexp_replace(v_text, c_url_token, '\1***@', 'gi');
      v_text := regexp_replace(v_text, c_query_secret, '\1***', 'gi');
      v_text := regexp_replace(v_text, c_keyword_password, '\1***', 'gi');
      v_text := regexp_replace(v_text, c_json_secret, '\1***"', 'gi');
      v_text := regexp_replace(v_text, c_header_secret, '\1***', 'gi');
      v_text := regexp_replace(v_text, c_auth_scheme, '\1***', 'gi');
      RETURN to_jsonb(v_text);
    ELSE
      IF p_all AND jsonb_typeof(p_value) <> 'null' THEN
        RETURN '"***"';
      END IF;
      RETURN p_value;
  END CASE;
END $$;

CREATE FUNCTION tide.plugin_type_check(p_kind text, p_type text, p_config jsonb, p_pipeline text)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_required jsonb;
  v_alternatives jsonb;
BEGIN
  SELECT required_keys INTO v_required FROM tide.plugin_types WHERE type = p_type AND kind = p_kind;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'pipeline "%": unknown % type % (known: %)', p_pipeline, p_kind, coalesce(quote_literal(p_type), 'NULL'),
      (SELECT string_agg(type, ', ' ORDER BY type) FROM tide.plugin_types WHERE kind = p_kind)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  FOR v_alternatives IN SELECT value FROM jsonb_array_elements(v_required) LOOP
    IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements_text(v_alternatives) k WHERE p_config ? k) THEN
      RAISE EXCEPTION 'pipeline "%": % config needs %', p_pipeline, p_type,
        (SELECT string_agg(quote_literal(k), ' or ') FROM jsonb_array_elements_text(v_alternatives) k)
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END LOOP;
END $$;

CREATE FUNCTION tide.config_check(p_config jsonb, p_pipeline text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF p_config IS NULL OR jsonb_typeof(p_config) <> 'object' THEN
    RAISE EXCEPTION 'pipeline "%": config must be a JSON object (got %)', p_pipeline, coalesce(jsonb_typeof(p_config), 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
END $$;

CREATE FUNCTION tide.batch_size_of(p_given integer, p_config jsonb, p_current integer, p_pipeline text) RETURNS integer
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_size integer;
BEGIN
  BEGIN
    v_size := coalesce(p_given, (p_config->>'batch_size')::integer, p_current, 100);
  EXCEPTION WHEN invalid_text_representation OR numeric_value_out_of_range THEN
    RAISE EXCEPTION 'pipeline "%": batch_size must be an integer (got %)', p_pipeline, p_config->'batch_size'
      USING ERRCODE = 'invalid_parameter_value';
  END;
  IF v_size NOT BETWEEN 1 AND 100000 THEN
    RAISE EXCEPTION 'pipeline "%": batch_size must be between 1 and 100000 (got %)', p_pipeline, v_size
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN v_size;
END $$;

-- The forward form behind every relay_set_outbox overload. p_group NULL means "bind by the rule":
-- config.consumer_group, else the pipeline's current group, else an unbound '<sink>-relay' group on
-- the outbox, else a group named after the pipeline.
CREATE FUNCTION tide.relay_upsert_outbox(p_name text, p_outbox text, p_sink_type text, p_group text,
                                         p_config jsonb, p_batch_size integer, p_enabled boolean)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_current tide.relay_pipelines;
  v_group text := coalesce(p_group, p_config->>'consumer_group');
  v_user text;
BEGIN
  PERFORM tide.check_name('pipeline', p_name);
  PERFORM tide.check_not_null('relay_set_outbox', 'p_outbox', p_outbox);
  PERFORM tide.config_check(p_config, p_name);
  IF NOT EXISTS (SELECT 1 FROM tide.outboxes WHERE name = p_outbox) THEN
    RAISE EXCEPTION 'pipeline "%": outbox "%" does not exist', p_name, p_outbox USING ERRCODE = 'undefined_object';
  END IF;
  PERFORM tide.plugin_type_check('sink', p_sink_type, p_config, p_name);
  SELECT * INTO v_current FROM tide.relay_pipelines WHERE name = p_name FOR UPDATE;
  IF FOUND AND v_current.direction <> 'forward' THEN
    RAISE EXCEPTION 'pipeline "%" already exists as a reverse pipeline', p_name USING ERRCODE = 'duplicate_object';
  END IF;
  IF v_group IS NULL AND v_current.outbox_name = p_outbox THEN
    v_group := v_current.consumer_group;
  END IF;
  IF v_group IS NULL THEN
    SELECT g.group_name INTO v_group FROM tide.consumer_groups g
     WHERE g.outbox_name = p_outbox AND g.group_name = p_sink_type || '-relay' AND g.relay_group_id = 'default'
       AND NOT EXISTS (SELECT 1 FROM tide.relay_pipelines p
                        WHERE p.outbox_name = p_outbox AND p.consumer_group = g.group_name AND p.name <> p_name);
  END IF;
  v_group := coalesce(v_group, p_name);
  PERFORM tide.check_name('consumer group', v_group);
  SELECT p.name INTO v_user FROM tide.relay_pipelines p
   WHERE p.outbox_name = p_outbox AND p.consumer_group = v_group AND p.name <> p_name;
  IF FOUND THEN
    RAISE EXCEPTION 'pipeline "%": consumer group "%" on outbox "%" is already used by pipeline "%"',
      p_name, v_group, p_outbox, v_user USING ERRCODE = 'duplicate_object',
      HINT = 'each pipeline needs its own consumer group; pick another name';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM tide.consumer_groups WHERE outbox_name = p_outbox AND group_name = v_group) THEN
    PERFORM tide.create_consumer_group(v_group, p_outbox, coalesce(p_config->>'auto_offset_reset', 'earliest'));
  END IF;

  INSERT INTO tide.relay_pipelines AS p (name, direction, outbox_name, consumer_group, plugin_type, config, batch_size, enabled)
  VALUES (p_name, 'forward', p_outbox, v_group, p_sink_type, p_config,
          tide.batch_size_of(p_batch_size, p_config, NULL, p_name), coalesce(p_enabled, true))
  ON CONFLICT (name) DO UPDATE
     SET outbox_name = excluded.outbox_name, consumer_group = excluded.consumer_group,
         plugin_type = excluded.plugin_type, config = excluded.config,
         batch_size = tide.batch_size_of(p_batch_size, p_config, p.batch_size, p_name),
         enabled = coalesce(p_enabled, p.enabled), updated_at = now(),
         config_version = p.config_version + CASE WHEN
           (p.outbox_name, p.consumer_group, p.plugin_type, p.config, p.batch_size, p.enabled) IS DISTINCT FROM
           (excluded.outbox_name, excluded.consumer_group, excluded.plugin_type, excluded.config,
            tide.batch_size_of(p_batch_size, p_config, p.batch_size, p_name), coalesce(p_enabled, p.enabled))
           THEN 1 ELSE 0 END;
  PERFORM pg_notify('tide_relay_config', p_name);
END $$;

CREATE FUNCTION tide.relay_set_outbox(p_name text, p_outbox text, p_sink_type text, p_config jsonb,
                                      p_batch_size integer DEFAULT NULL, p_enabled boolean DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_name('pipeline', p_name);
  PERFORM tide.config_check(p_config, p_name);
  -- With config.sink_type the third argument names the consumer group; without, the sink type.
  IF p_config ? 'sink_type' AND p_config->>'sink_type' IS DISTINCT FROM p_sink_type THEN
    PERFORM tide.relay_upsert_outbox(p_name, p_outbox, p_config->>'sink_type', p_sink_type, p_config, p_batch_size, p_enabled);
  ELSE
    PERFORM tide.relay_upsert_outbox(p_name, p_outbox, p_sink_type, NULL, p_config, p_batch_size, p_enabled);
  END IF;
END $$;

CREATE FUNCTION tide.relay_set_outbox(p_name text, p_outbox text, p_config jsonb,
                                      p_batch_size integer DEFAULT NULL, p_enabled boolean DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_name('pipeline', p_name);
  PERFORM tide.config_check(p_config, p_name);
  IF NOT p_config ? 'sink_type' THEN
    RAISE EXCEPTION 'pipeline "%": config needs ''sink_type'' (known: %)', p_name,
      (SELECT string_agg(type, ', ' ORDER BY type) FROM tide.plugin_types WHERE kind = 'sink')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM tide.relay_upsert_outbox(p_name, p_outbox, p_config->>'sink_type', NULL, p_config, p_batch_size, p_enabled);
END $$;

CREATE FUNCTION tide.relay_set_inbox(p_name text, p_inbox text, p_config jsonb, p_source text DEFAULT NULL,
                                     p_batch_size integer DEFAULT NULL, p_idempotent boolean DEFAULT NULL,
                                     p_enabled boolean DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_current tide.relay_pipelines;
  v_source text;
BEGIN
  PERFORM tide.check_name('pipeline', p_name);
  PERFORM tide.check_not_null('relay_set_inbox', 'p_inbox', p_inbox);
  PERFORM tide.config_check(p_config, p_name);
  v_source := coalesce(p_source, p_config->>'source_type');
  IF v_source IS NULL THEN
    RAISE EXCEPTION 'pipeline "%": name the source with p_source or config ''source_type'' (known: %)', p_name,
      (SELECT string_agg(type, ', ' ORDER BY type) FROM tide.plugin_types WHERE kind = 'source')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_source IS NOT NULL AND p_config ? 'source_type' AND p_config->>'source_type' <> p_source THEN
    RAISE EXCEPTION 'pipeline "%": p_source % and config source_type % disagree', p_name,
      quote_literal(p_source), quote_literal(p_config->>'source_type') USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM tide.inboxes WHERE name = p_inbox) THEN
    RAISE EXCEPTION 'pipeline "%": inbox "%" does not exist', p_name, p_inbox USING ERRCODE = 'undefined_object';
  END IF;
  PERFORM tide.plugin_type_check('source', v_source, p_config, p_name);
  SELECT * INTO v_current FROM tide.relay_pipelines WHERE name = p_name FOR UPDATE;
  IF FOUND AND v_current.direction <> 'reverse' THEN
    RAISE EXCEPTION 'pipeline "%" already exists as a forward pipeline', p_name USING ERRCODE = 'duplicate_object';
  END IF;
  INSERT INTO tide.relay_pipelines AS p (name, direction, inbox_name, plugin_type, config, batch_size, enabled, idempotent)
  VALUES (p_name, 'reverse', p_inbox, v_source, p_config, tide.batch_size_of(p_batch_size, p_config, NULL, p_name),
          coalesce(p_enabled, true), coalesce(p_idempotent, true))
  ON CONFLICT (name) DO UPDATE
     SET inbox_name = excluded.inbox_name, plugin_type = excluded.plugin_type, config = excluded.config,
         batch_size = tide.batch_size_of(p_batch_size, p_config, p.batch_size, p_name),
         enabled = coalesce(p_enabled, p.enabled), idempotent = coalesce(p_idempotent, p.idempotent), updated_at = now(),
         config_version = p.config_version + CASE WHEN
           (p.inbox_name, p.plugin_type, p.config, p.batch_size, p.enabled, p.idempotent) IS DISTINCT FROM
           (excluded.inbox_name, excluded.plugin_type, excluded.config,
            tide.batch_size_of(p_batch_size, p_config, p.batch_size, p_name), coalesce(p_enabled, p.enabled),
            coalesce(p_idempotent, p.idempotent))
           THEN 1 ELSE 0 END;
  PERFORM pg_notify('tide_relay_config', p_name);
END $$;

CREATE FUNCTION tide.relay_describe(p tide.relay_pipelines) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT jsonb_strip_nulls(jsonb_build_object(
    'name', p.name, 'direction', p.direction, 'enabled', p.enabled,
    'outbox', p.outbox_name, 'consumer_group', p.consumer_group, 'inbox', p.inbox_name,
    CASE p.direction WHEN 'forward' THEN 'sink_type' ELSE 'source_type' END, p.plugin_type,
    'batch_size', p.batch_size, 'idempotent', CASE p.direction WHEN 'reverse' THEN p.idempotent END,
    'config', tide.redact(p.config), 'config_version', p.config_version, 'updated_at', p.updated_at));
$$;

CREATE FUNCTION tide.relay_get_config(p_name text) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_pipeline tide.relay_pipelines;
BEGIN
  PERFORM tide.check_not_null('relay_get_config', 'p_name', p_name);
  SELECT * INTO v_pipeline FROM tide.relay_pipelines WHERE name = p_name;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'pipeline "%" does not exist', p_name USING ERRCODE = 'undefined_object';
  END IF;
  RETURN tide.relay_describe(v_pipeline);
END $$;

CREATE FUNCTION tide.relay_list_configs()
RETURNS TABLE (name text, direction text, enabled boolean, plugin_type text, source text, target text,
               consumer_group text, batch_size integer, config jsonb, updated_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT p.name, p.direction, p.enabled, p.plugin_type,
         CASE p.direction WHEN 'forward' THEN p.outbox_name ELSE p.plugin_type END,
         CASE p.direction WHEN 'forward' THEN p.plugin_type ELSE p.inbox_name END,
         p.consumer_group, p.batch_size, tide.redact(p.config), p.updated_at
    FROM tide.relay_pipelines p ORDER BY p.name;
$$;

CREATE FUNCTION tide.relay_set_enabled(p_name text, p_enabled boolean) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  UPDATE tide.relay_pipelines
     SET enabled = p_enabled, updated_at = now(),
         config_version = config_version + CASE WHEN enabled IS DISTINCT FROM p_enabled THEN 1 ELSE 0 END
   WHERE name = p_name;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'pipeline "%" does not exist', p_name USING ERRCODE = 'undefined_object';
  END IF;
  PERFORM pg_notify('tide_relay_config', p_name);
END $$;

CREATE FUNCTION tide.relay_enable(p_name text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT tide.check_not_null('relay_enable', 'p_name', p_name);
  SELECT tide.relay_set_enabled(p_name, true);
$$;

CREATE FUNCTION tide.relay_disable(p_name text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT tide.check_not_null('relay_disable', 'p_name', p_name);
  SELECT tide.relay_set_enabled(p_name, false);
$$;

-- Removes the pipeline; its consumer group (and so its position) stays until dropped.
CREATE FUNCTION tide.relay_delete(p_name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM tide.check_not_null('relay_delete', 'p_name', p_name);
  DELETE FROM tide.relay_pipelines WHERE name = p_name;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'pipeline "%" does not exist', p_name USING ERRCODE = 'undefined_object';
  END IF;
  PERFORM pg_notify('tide_relay_config', p_name);
END $$;

-- Relays register the types of their drop-in plugins so the catalog accepts them. p_required_keys
-- is what plugin_type_check reads: a list of groups, each a non-empty list of key names of which a
-- config must have at least one, e.g. [["url"], ["subject", "subject_template"]].
CREATE FUNCTION tide.register_plugin_type(p_type text, p_kind text, p_required_keys jsonb DEFAULT '[]')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_bad jsonb;
BEGIN
  PERFORM tide.check_name('plugin type', p_type);
  IF p_kind IS NULL OR p_kind NOT IN ('sink', 'source') THEN
    RAISE EXCEPTION 'plugin type "%": kind must be ''sink'' or ''source'' (got %)', p_type, coalesce(quote_literal(p_kind), 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM tide.check_not_null('register_plugin_type', 'p_required_keys', p_required_keys);
  IF jsonb_typeof(p_required_keys) = 'array' THEN
    SELECT g INTO v_bad FROM jsonb_array_elements(p_required_keys) g
     WHERE CASE WHEN jsonb_typeof(g) = 'array'
                THEN jsonb_array_length(g) = 0 OR EXISTS (SELECT 1 FROM jsonb_array_elements(g) k
                                                           WHERE jsonb_typeof(k) <> 'string' OR k = '""')
                ELSE true END
     LIMIT 1;
  END IF;
  IF jsonb_typeof(p_required_keys) <> 'array' OR v_bad IS NOT NULL THEN
    RAISE EXCEPTION 'plugin type "%": required_keys must be a list of non-empty lists of key names, like [["url"], ["topic", "topic_template"]] (got %)',
      p_type, left(p_required_keys::text, 200) USING ERRCODE = 'invalid_parameter_value';
  END IF;
  INSERT INTO tide.plugin_types (type, kind, required_keys) VALUES (p_type, p_kind, p_required_keys)
  ON CONFLICT (type, kind) DO UPDATE SET required_keys = excluded.required_keys, registered_at = now()
   WHERE NOT tide.plugin_types.builtin;
END $$;

-- Waits until the relays run the pipeline's current config_version, polling the catalog: an enabled
-- pipeline needs a live owner (heartbeat within 30 s) started with that version and no live owner on
-- an older one; a disabled one needs no live owner. Returns false when p_timeout passes first.
-- Not SECURITY DEFINER: it reads two catalog tables that tide_relay and the owner may read anyway.
-- Each poll is a new statement and so sees what other transactions committed meanwhile (READ
-- COMMITTED); a change made in the caller's own open transaction can never be applied, so that
-- is refused at once instead of waiting out the timeout.
CREATE FUNCTION tide.relay_wait_applied(p_name text, p_timeout interval DEFAULT '30 seconds') RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_deadline timestamptz;
  v_pipeline record;
  v_applied boolean;
BEGIN
  PERFORM tide.check_not_null('relay_wait_applied', 'p_name', p_name);
  PERFORM tide.check_not_null('relay_wait_applied', 'p_timeout', p_timeout);
  IF p_timeout < interval '0' THEN
    RAISE EXCEPTION 'tide.relay_wait_applied: p_timeout must not be negative (got %)', p_timeout
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  v_deadline := clock_timestamp() + p_timeout;
  LOOP
    SELECT p.config_version, p.enabled, coalesce(p.xmin = xid(pg_current_xact_id_if_assigned()), false) AS mine
      INTO v_pipeline FROM tide.relay_pipelines p WHERE p.name = p_name;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'pipeline "%" does not exist', p_name USING ERRCODE = 'undefined_object';
    END IF;
    IF v_pipeline.mine THEN
      RAISE EXCEPTION 'pipeline "%": its change is not committed yet, so no relay can apply it', p_name
        USING ERRCODE = 'active_sql_transaction',
              HINT = 'commit first, then call tide.relay_wait_applied in a new transaction (psql -c runs all its statements in one)';
    END IF;
    v_applied := CASE WHEN v_pipeline.enabled THEN
         EXISTS (SELECT 1 FROM tide.relay_pipeline_state s
                  WHERE s.pipeline = p_name AND s.owner_id IS NOT NULL AND s.heartbeat_at > clock_timestamp() - interval '30 seconds'
                    AND s.config_version = v_pipeline.config_version)
         AND NOT EXISTS (SELECT 1 FROM tide.relay_pipeline_state s
                          WHERE s.pipeline = p_name AND s.owner_id IS NOT NULL AND s.heartbeat_at > clock_timestamp() - interval '30 seconds'
                            AND s.config_version IS DISTINCT FROM v_pipeline.config_version)
       ELSE
         NOT EXISTS (SELECT 1 FROM tide.relay_pipeline_state s
                      WHERE s.pipeline = p_name AND s.owner_id IS NOT NULL AND s.heartbeat_at > clock_timestamp() - interval '30 seconds')
       END;
    IF v_applied THEN
      RETURN true;
    END IF;
    IF clock_timestamp() >= v_deadline THEN
      RETURN false;
    END IF;
    PERFORM pg_sleep(least(0.05, greatest(0, extract(epoch FROM v_deadline - clock_timestamp()))));
  END LOOP;
END $$;
