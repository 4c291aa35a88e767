-- 006: roles and grants. Applications get tide_publisher, the relay tide_relay, dashboards
-- tide_reader. API functions are SECURITY DEFINER with a pinned search_path, so none of these roles
-- needs rights on the tables behind them, and nobody can shadow a function through search_path.

DO $$
DECLARE
  v_role text;
BEGIN
  FOREACH v_role IN ARRAY ARRAY['tide_publisher', 'tide_relay', 'tide_reader'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
      BEGIN
        EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
      EXCEPTION WHEN duplicate_object OR unique_violation THEN
        NULL; -- another database of this cluster created it at the same moment
      END;
    END IF;
  END LOOP;
END $$;

REVOKE ALL ON ALL TABLES IN SCHEMA tide FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA tide FROM PUBLIC;
GRANT USAGE ON SCHEMA tide TO tide_publisher, tide_relay, tide_reader;

-- Publishing and processing the inbox, inside the application's own transactions.
GRANT EXECUTE ON FUNCTION
  tide.outbox_publish(text, jsonb, jsonb),
  tide.outbox_publish(text, text, jsonb, jsonb),
  tide.inbox_pending(text),
  tide.inbox_mark_processed(text, text),
  tide.inbox_mark_processed(text, bigint),
  tide.inbox_mark_failed(text, text, text),
  tide.replay_inbox_messages(text, text[])
TO tide_publisher;

-- Monitoring: views and redacted catalog reads.
GRANT SELECT ON tide.consumer_lag, tide.outbox_pending, tide.pipeline_status, tide.unread_consumer_groups,
                tide.outboxes, tide.inboxes, tide.consumer_groups, tide.relay_pipeline_state, tide.relay_dlq,
                tide.plugin_types
   TO tide_reader, tide_relay;
GRANT EXECUTE ON FUNCTION
  tide.relay_get_config(text),
  tide.relay_list_configs(),
  tide.relay_dlq_list(text, text),
  tide.inbox_pending(text),
  -- called by the monitoring views, which run functions with the reader's rights
  tide.is_delivered(xid8, bigint, pg_snapshot, pg_snapshot, bigint),
  tide.undelivered_count(text, pg_snapshot, pg_snapshot, bigint),
  tide.consumer_group_lag(text, text, text)
TO tide_reader;

-- The relay reads raw configs (it needs the secrets) and drives positions, DLQ and state.
GRANT SELECT ON tide.relay_pipelines, tide.outbox_messages, tide.schema_migrations TO tide_relay;
GRANT INSERT, UPDATE, DELETE ON tide.relay_pipeline_state TO tide_relay;
GRANT UPDATE ON tide.relay_dlq TO tide_relay;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA tide TO tide_relay;
