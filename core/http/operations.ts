// What an operator does during an incident, as one function each over the catalog's SQL functions:
// browse, replay and discard dead letters, pause and resume a pipeline, replay an inbox's failed
// messages, and find where one event is. The console's HTTP actions (core/http/http_console.ts) and the
// CLI (`pg-tide dlq`, `pg-tide trace`) both call these, so they cannot drift apart.

import type { Sql } from "../db.ts";
import { redactText } from "../redact.ts";

/** A forward dead letter as tide.relay_dlq_list returns it; payload and headers as stored. */
export interface DeadLetter {
  id: number;
  pipeline: string;
  outbox: string;
  message_id: number;
  topic: string | null;
  /** The payload's JSON text exactly as PostgreSQL holds it. */
  payload: string;
  headers: Record<string, unknown>;
  error: string;
  attempts: number;
  status: "open" | "requeued" | "redelivered" | "resolved";
  failed_at: Date;
  updated_at: Date;
}

/** open (waiting for a person), requeued (replay asked), redelivered, resolved (discarded), or all. */
export const DLQ_STATUSES = ["open", "requeued", "redelivered", "resolved", "all"] as const;
export type DlqStatus = (typeof DLQ_STATUSES)[number];

export const DEFAULT_DLQ_LIMIT = 100;

export async function listDeadLetters(
  sql: Sql,
  options: { pipeline?: string; status?: DlqStatus; limit?: number } = {},
): Promise<DeadLetter[]> {
  const status = options.status ?? "open";
  const rows = await sql`
    SELECT id, pipeline, outbox_name, message_id, topic, payload::text AS payload, headers, error, attempts, status,
           failed_at, updated_at
      FROM tide.relay_dlq_list(${options.pipeline ?? null}, ${status === "all" ? null : status})
     LIMIT ${options.limit ?? DEFAULT_DLQ_LIMIT}`;
  return rows.map((row) => ({
    id: Number(row.id),
    pipeline: row.pipeline,
    outbox: row.outbox_name,
    message_id: Number(row.message_id),
    topic: row.topic,
    payload: row.payload,
    headers: row.headers,
    error: redactText(row.error),
    attempts: row.attempts,
    status: row.status,
    failed_at: row.failed_at,
    updated_at: row.updated_at,
  }));
}

/** Asks the owning relay to deliver one dead letter again. */
export async function replayDeadLetter(sql: Sql, id: number): Promise<number> {
  const [row] = await sql`SELECT tide.relay_dlq_requeue(${id}::bigint) AS count`;
  return Number(row.count);
}

/** Asks the owning relay to deliver every open dead letter of a pipeline again; returns how many. */
export async function replayAllDeadLetters(sql: Sql, pipeline: string): Promise<number> {
  const [row] = await sql`SELECT tide.relay_dlq_requeue(${pipeline}::text) AS count`;
  return Number(row.count);
}

/** Marks a dead letter resolved: it is never delivered (it stays listed under status resolved). */
export async function discardDeadLetter(sql: Sql, id: number): Promise<void> {
  await sql`SELECT tide.relay_dlq_resolve(${id}::bigint)`;
}

/** Pause (relay_disable) or resume (relay_enable) a pipeline; its position stays where it is. */
export async function setPipelineEnabled(sql: Sql, pipeline: string, enabled: boolean): Promise<void> {
  if (enabled) await sql`SELECT tide.relay_enable(${pipeline})`;
  else await sql`SELECT tide.relay_disable(${pipeline})`;
}

/** Gives every failed or dead-lettered message of an inbox another round of attempts. */
export async function replayFailedInbox(sql: Sql, inbox: string): Promise<number> {
  const [row] = await sql`SELECT tide.inbox_replay_failed(${inbox}) AS count`;
  return Number(row.count);
}

/** One place an event is: a consumer group of its outbox, or an inbox that received it. */
export interface TraceRow {
  kind: "outbox" | "inbox";
  /** The outbox or inbox name. */
  place: string | null;
  message_id: number | null;
  event_id: string | null;
  consumer_group: string | null;
  relay_group_id: string | null;
  pipeline: string | null;
  /** outbox: delivered, pending, dead-lettered, replay requested, discarded, not found; inbox: processed, pending, failed, dead-lettered. */
  state: string;
  attempts: number | null;
  detail: string | null;
  at: Date | null;
}

/** Where is my event? `key` is an outbox message id, its dedup key (<outbox>:<id>) or an inbox event id. */
export async function traceEvent(sql: Sql, key: string): Promise<TraceRow[]> {
  const rows = await sql`SELECT * FROM tide.trace_event(${key})`;
  return rows.map((row) => ({
    kind: row.kind,
    place: row.place,
    message_id: row.message_id === null ? null : Number(row.message_id),
    event_id: row.event_id,
    consumer_group: row.consumer_group,
    relay_group_id: row.relay_group_id,
    pipeline: row.pipeline,
    state: row.state,
    attempts: row.attempts,
    detail: row.detail === null ? null : redactText(row.detail),
    at: row.at,
  }));
}
