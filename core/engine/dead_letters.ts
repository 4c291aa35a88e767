// Where a forward pipeline's undeliverable messages are recorded, and how requeued ones come back:
// the dead letters and parked messages (isolate_poison) of a batch are written in the transaction of
// its acknowledgement (tide.relay_dlq_add, tide.relay_hold), so both are recorded or neither; dead
// letters an operator requeued (tide.relay_dlq_requeue) are delivered once more and settled
// (tide.relay_dlq_redelivered).

import type { Sql } from "../db.ts";
import type { Logger } from "../log.ts";
import type { SinkInstance } from "../plugin.ts";
import type { Formatter } from "../config/wire_format.ts";
import { redactText } from "../redact.ts";
import { toMessage, type DeadLetter, type MessageRow, type Parked } from "./forward_batch.ts";

/** Whose messages: the pipeline, and for parked ones the relay group and lane that holds them. */
export interface DeadLetterOwner {
  pipeline: string;
  relayGroupId: string;
  lane: number;
}

/**
 * `commit` (the acknowledgement, on the transaction) and the dead letters and parked messages in one
 * transaction: both are recorded, or neither. False when the commit was refused, or when `cutOff()`
 * (the worker was fenced or aborted meanwhile) rolled it back.
 */
export function commitWithDeadLetters(sql: Sql, commit: (sql: Sql) => Promise<boolean>, owner: DeadLetterOwner, dead: DeadLetter[],
  parked: Parked[], cutOff: () => boolean): Promise<boolean> {
  return sql.begin(async (tx) => {
    const moved = await commit(tx as unknown as Sql);
    if (!moved) return false; // nothing of this batch is recorded: the dead letters neither
    if (cutOff()) throw new Fenced();
    for (const entry of dead) {
      // A target that echoes the request (headers included) would put credentials in the error.
      await tx`SELECT tide.relay_dlq_add(${owner.pipeline}, ${entry.message.id}, ${redactText(entry.error)}, ${entry.attempts})`;
    }
    for (const entry of parked) {
      await tx`SELECT tide.relay_hold(${owner.pipeline}, ${owner.relayGroupId}, ${owner.lane}, ${entry.key}, ${entry.message.id},
                                      ${entry.error === null ? null : redactText(entry.error)}, ${entry.attempts})`;
    }
    return true;
  }).catch((error) => {
    if (error instanceof Fenced) return false;
    throw error;
  });
}

/** Dead letters an operator requeued (tide.relay_dlq_requeue) of `pipeline`, delivered once more through `sink`. */
export async function redeliverRequeued(sql: Sql, pipeline: string, sink: SinkInstance, format: Formatter | undefined,
  log: Logger): Promise<void> {
  const rows = await sql<(MessageRow & { dlq_id: bigint })[]>`
    SELECT id AS dlq_id, message_id AS id, outbox_name AS outbox, topic, payload::text AS payload, headers::text AS headers,
           coalesce(message_created_at, failed_at) AS created_at
      FROM tide.relay_dlq WHERE pipeline = ${pipeline} AND status = 'requeued' ORDER BY id LIMIT 1000`;
  if (rows.length === 0) return;
  const messages = rows.map((row) => toMessage(row, row.outbox));
  const failures = await sink.publish(format ? messages.map(format) : messages);
  const failed = new Set(failures.map((f) => f.id));
  const done = rows.filter((row) => !failed.has(row.id)).map((row) => String(row.dlq_id));
  const again = rows.filter((row) => failed.has(row.id)).map((row) => String(row.dlq_id));
  await sql`SELECT tide.relay_dlq_redelivered(${sql.array(done)}::bigint[], ${sql.array(again)}::bigint[])`;
  log.info("requeued dead letters delivered", { delivered: done.length, failed: again.length });
}

/** Thrown inside the commit transaction to roll it back when the worker was fenced meanwhile. */
class Fenced extends Error {}
