// Pipeline status from the catalog: what `pg-tide status` prints and /api/v1/pipelines serves.
// Forward pipelines have a position (committed offset) and a lag in the outbox. Reverse pipelines
// have neither on the tide side (their source keeps its own offsets), so they report how many
// messages wait in their inbox for the application instead. Consumer groups that no pipeline reads
// are listed apart: their waiting messages are kept from the retention sweep until they are read.

import type { Sql } from "./db.ts";

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

/** A heartbeat older than this means the owner is gone (the lock, not this, decides ownership). */
export const OWNER_STALE_SECONDS = 30;

export async function pipelineStatus(sql: Sql, relayGroupId: string): Promise<PipelineStatus[]> {
  const rows = await sql`
    SELECT p.name, p.direction, p.enabled, p.plugin_type, p.outbox_name AS outbox, p.inbox_name AS inbox,
           tide.lane_group(p.consumer_group, l.lane, n.lanes) AS consumer_group, l.lane, n.lanes, s.owner_id AS owner,
           coalesce(s.owner_id IS NOT NULL AND s.heartbeat_at > now() - make_interval(secs => ${OWNER_STALE_SECONDS}), false)
             AS owner_alive,
           s.heartbeat_at, s.healthy, s.last_error, s.last_error_at, s.last_success_at,
           coalesce(s.retry_attempt, 0) AS retry_attempt, s.circuit,
           p.config_version, s.config_version AS applied_version,
           g.committed_offset, g.delivered_total,
           CASE WHEN p.direction = 'forward' THEN
             coalesce(tide.consumer_group_lag(p.outbox_name, tide.lane_group(p.consumer_group, l.lane, n.lanes), ${relayGroupId}),
                      tide.consumer_group_lag(p.outbox_name, tide.lane_group(p.consumer_group, l.lane, n.lanes), 'default')) END AS lag,
           (SELECT count(*) FROM tide.relay_dlq q WHERE q.pipeline = p.name AND q.status IN ('open', 'requeued')) AS dlq_depth,
           (SELECT count(*) FROM tide.relay_held h
             WHERE h.pipeline = p.name AND h.relay_group_id = ${relayGroupId} AND h.lane = l.lane) AS held,
           CASE WHEN i.name IS NOT NULL THEN (SELECT count(*) FROM tide.inbox_pending(i.name)) END AS inbox_pending
      FROM tide.relay_pipelines p
     CROSS JOIN LATERAL (SELECT CASE p.direction WHEN 'forward' THEN tide.pipeline_lanes(p.config) ELSE 1 END AS lanes) n
     CROSS JOIN LATERAL generate_series(0, n.lanes - 1) AS l(lane)
      LEFT JOIN tide.inboxes i ON i.name = p.inbox_name
      LEFT JOIN tide.relay_pipeline_state s ON s.pipeline = p.name AND s.relay_group_id = ${relayGroupId} AND s.lane = l.lane
      LEFT JOIN tide.consumer_groups g
        ON g.outbox_name = p.outbox_name AND g.group_name = tide.lane_group(p.consumer_group, l.lane, n.lanes)
       AND g.relay_group_id = ${relayGroupId}
     ORDER BY p.name, l.lane`;
  return rows.map((row) => ({
    ...(row as any),
    error_is_past: errorIsPast(row.healthy),
    config_version: Number(row.config_version),
    applied_version: row.applied_version === null ? null : Number(row.applied_version),
    committed_offset: row.committed_offset === null ? null : Number(row.committed_offset),
    delivered_total: row.delivered_total === null ? null : Number(row.delivered_total),
    lag: row.lag === null ? null : Number(row.lag),
    inbox_pending: row.inbox_pending === null ? null : Number(row.inbox_pending),
    dlq_depth: Number(row.dlq_depth),
    held: Number(row.held),
  }));
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
