// Pipeline status from the catalog (the tide.pipeline_status view, sql/013_relay_functions.sql): what
// `pg-tide status` prints and /api/v1/pipelines serves.
// Forward pipelines have a position (committed offset) and a lag in the outbox. Reverse pipelines
// have neither on the tide side (their source keeps its own offsets), so they report how many
// messages wait in their inbox for the application instead. Consumer groups that no pipeline reads
// are listed apart: their waiting messages are kept from the retention sweep until they are read.

import type { Sql } from "../db.ts";

export interface PipelineStatus {
  name: string;
  direction: "forward" | "reverse";
  enabled: boolean;
  /** Sink type (forward) or source type (reverse). */
  plugin_type: string;
  outbox: string | null;
  inbox: string | null;
  /** The consumer group this row reads: with lanes, the lane's group. */
  consumer_group: string | null;
  /** One row per lane (config `lanes`): this row's lane (0..lanes-1), and how many the pipeline has. */
  lane: number;
  lanes: number;
  /** isolate_poison: messages of this lane parked with their key (tide.relay_held), waiting for a retry. */
  held: number;
  owner: string | null;
  /** The owner's last heartbeat is recent (a few reconcile intervals). */
  owner_alive: boolean;
  heartbeat_at: Date | null;
  healthy: boolean | null;
  last_error: string | null;
  last_error_at: Date | null;
  /** The last time the owner connected or delivered a batch. */
  last_success_at: Date | null;
  /** The error is past: the pipeline is healthy, or succeeded after the error. */
  error_is_past: boolean;
  retry_attempt: number;
  /** The catalog's version of the config (bumped by every change). */
  config_version: number;
  /** The version the owner runs (null: no owner has started it). */
  applied_version: number | null;
  /** closed, open (paused after repeated failures) or half-open (probing); null when not owned. */
  circuit: string | null;
  /** Forward: id of the last message the consumer group acknowledged (0 before the first). */
  committed_offset: number | null;
  delivered_total: number | null;
  /** Forward: committed outbox messages not delivered yet. */
  lag: number | null;
  /** Reverse: inbox rows the application has not processed yet (dead letters excluded). */
  inbox_pending: number | null;
  dlq_depth: number;
}

/** A row of tide.unread_consumer_groups: a group no pipeline reads, with messages waiting. */
export interface UnreadConsumerGroup {
  outbox: string;
  group: string;
  relay_group_id: string;
  /** Messages waiting for the group, kept from the retention sweep until it reads them. */
  lag: number;
  position_moved_at: Date;
}

/**
 * The rows of tide.pipeline_status for one relay group: per pipeline and lane, the group's own row,
 * or (when the group never ran that lane) the catalog's facts with no owner, health or position of
 * its own. The view lists a lane that no relay group ran once, under no relay group, with the
 * positions of the 'default' group.
 */
export async function pipelineStatus(sql: Sql, relayGroupId: string): Promise<PipelineStatus[]> {
  const rows = await sql`
    SELECT DISTINCT ON (pipeline, lane) *
      FROM tide.pipeline_status
     ORDER BY pipeline, lane, relay_group_id IS NOT DISTINCT FROM ${relayGroupId} DESC, relay_group_id IS NULL DESC`;
  return rows.map((row) => {
    const own = row.relay_group_id === relayGroupId;
    const positions = own || (row.relay_group_id === null && relayGroupId === "default");
    const lag = own || row.relay_group_id === null ? row.lag : null;
    // In the order `pg-tide status --output json` has always printed them.
    return {
      name: row.pipeline,
      direction: row.direction,
      enabled: row.enabled,
      plugin_type: row.plugin_type,
      outbox: row.outbox,
      inbox: row.inbox,
      consumer_group: row.consumer_group,
      lane: row.lane,
      lanes: row.lanes,
      owner: own ? row.owner_id : null,
      owner_alive: own && row.owner_alive,
      heartbeat_at: own ? row.heartbeat_at : null,
      healthy: own ? row.healthy : null,
      last_error: own ? row.last_error : null,
      last_error_at: own ? row.last_error_at : null,
      last_success_at: own ? row.last_success_at : null,
      retry_attempt: own ? row.retry_attempt ?? 0 : 0,
      circuit: own ? row.circuit : null,
      config_version: Number(row.config_version),
      applied_version: own && row.applied_config_version !== null ? Number(row.applied_config_version) : null,
      committed_offset: positions && row.committed_offset !== null ? Number(row.committed_offset) : null,
      delivered_total: positions && row.delivered_total !== null ? Number(row.delivered_total) : null,
      lag: lag === null ? null : Number(lag),
      dlq_depth: Number(row.dlq_depth),
      held: own ? Number(row.held) : 0,
      inbox_pending: row.inbox_pending === null ? null : Number(row.inbox_pending),
      error_is_past: errorIsPast(own ? row.healthy : null),
    };
  });
}

export async function unreadConsumerGroups(sql: Sql): Promise<UnreadConsumerGroup[]> {
  const rows = await sql`
    SELECT outbox_name, group_name, relay_group_id, lag, position_moved_at FROM tide.unread_consumer_groups`;
  return rows.map((row) => ({
    outbox: row.outbox_name,
    group: row.group_name,
    relay_group_id: row.relay_group_id,
    lag: Number(row.lag),
    position_moved_at: row.position_moved_at,
  }));
}

/**
 * An error is past once the pipeline is healthy again (it connected or delivered since): a status
 * shows it as history, greyed with its time, not as the current state.
 */
export function errorIsPast(healthy: boolean | null): boolean {
  return healthy !== false;
}

/** A row of tide.wal_capture_status: a table captured from the WAL and its replication slot's health. */
export interface WalSlotStatus {
  table: string;
  outbox: string;
  slot: string;
  /** streaming, not read, over limit, paused, dropped, missing or lost (sql/014_wal_slot_limit.sql). */
  state: string;
  /** Why and since when it is paused or dropped. */
  state_reason: string | null;
  state_at: Date | null;
  /** WAL written since the position last confirmed (null: the slot is gone). */
  lag_bytes: number | null;
  lag_limit_bytes: number;
  on_lag_limit: string;
  /** Seconds since a relay last confirmed a position of the slot. */
  confirmed_age_seconds: number;
}

export async function walSlotStatus(sql: Sql): Promise<WalSlotStatus[]> {
  const rows = await sql`
    SELECT table_name, outbox_name, slot_name, state, state_reason, state_at, lag_bytes, lag_warn_bytes, on_lag_limit,
           extract(epoch FROM confirmed_age)::float8 AS confirmed_age_seconds
      FROM tide.wal_capture_status ORDER BY table_name, outbox_name`;
  return rows.map((row) => ({
    table: row.table_name,
    outbox: row.outbox_name,
    slot: row.slot_name,
    state: row.state,
    state_reason: row.state_reason,
    state_at: row.state_at,
    lag_bytes: row.lag_bytes === null ? null : Number(row.lag_bytes),
    lag_limit_bytes: Number(row.lag_warn_bytes),
    on_lag_limit: row.on_lag_limit,
    confirmed_age_seconds: Number(row.confirmed_age_seconds),
  }));
}
