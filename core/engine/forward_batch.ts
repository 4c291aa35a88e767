// A forward batch as the worker handles it, and the pure decisions about it: the rows read and the
// fence they were read under, the message made of a row, how many messages the next read asks for,
// which messages pass the filter, and where the messages that cannot be delivered go (dead letters,
// parked ones). Nothing here does I/O or holds state: core/engine/forward.ts does, with these.

import { handled } from "../runtime.ts";
import { ConfigError } from "../errors.ts";
import type { FilterFn } from "../config/filter.ts";
import type { DeliveryFailure, OutboxMessage } from "../plugin.ts";
import { parseJson } from "../json.ts";
import { outboxMessage, payloadSize } from "../message.ts";

/** What a batch was read under: tide.consumer_commit refuses an acknowledgement when any has moved. */
export interface Fence {
  /** consumer_groups.owner_epoch this worker claimed when it took the pipeline over. */
  ownerEpoch: bigint;
  intervalSeq: bigint;
  readCursor: bigint;
  generation: bigint;
}

/** A batch as read, with its fence. */
export interface Batch {
  messages: OutboxMessage[];
  fence: Fence;
}

/** A message parked with its key (isolate_poison): the failing one with its error, later ones with none. */
export interface Parked {
  message: OutboxMessage;
  key: string;
  error: string | null;
  attempts: number;
}

/** A message on its way to the dead-letter queue, with why and after how many attempts. */
export interface DeadLetter {
  message: OutboxMessage;
  error: string;
  attempts: number;
}

/**
 * A message as read: payload and headers as the text PostgreSQL produced (`::text`), never through
 * the driver's JSON.parse, which would round big numbers to the nearest double.
 */
export interface MessageRow {
  id: bigint;
  outbox: string;
  topic: string | null;
  payload: string;
  headers: string | null;
  created_at: Date;
}

/**
 * A row of consumer_read_batch, consumer_read_ahead or consumer_commit_read as ConsumerGroup reads
 * it: a message (its outbox is the group's) with the fence it was read under, given on the first row.
 * Its payload is the bytes of the text PostgreSQL sent, not decoded (OutboxMessage.payloadBytes).
 */
export type FencedRow = Omit<MessageRow, "outbox" | "payload"> & {
  payload: Uint8Array;
  interval_seq: bigint | null;
  read_cursor: bigint | null;
  generation: bigint | null;
};

/** The default max_batch_size of a sink that grows batches (growBatches). */
const GROWN_BATCH_SIZE = 1000;
/** A batch grows only while it would stay under this much payload text. */
const GROWN_BATCH_BYTES = 2 * 1024 * 1024;

/** The message of a row read from `outbox` (a read's rows leave their outbox out: it is the group's). */
export function toMessage(row: Omit<MessageRow, "outbox" | "payload"> & { payload: string | Uint8Array }, outbox: string, headers = headersOf(row.headers)): OutboxMessage {
  return outboxMessage({ id: row.id, outbox, topic: row.topic, payload: row.payload, headers, createdAt: row.created_at });
}

function headersOf(text: string | null): Record<string, unknown> {
  return text === null || text === "{}" ? {} : (parseJson(text) as Record<string, unknown>);
}

/**
 * The batch of `rows` read from `outbox` (undefined for none), fenced on what they were read under
 * (the first row's) and the owner's epoch.
 */
export function batchOf(rows: FencedRow[], ownerEpoch: bigint, outbox: string): Batch | undefined {
  if (rows.length === 0 || rows[0].id === null) return undefined;
  const { interval_seq: intervalSeq, read_cursor: readCursor, generation } = rows[0];
  if (intervalSeq === null || readCursor === null || generation === null) throw new Error("a read returned messages without their fence");
  // Rows whose headers are the same text (an event type on every message) share one parsed object,
  // frozen: the contract says a sink reads headers, and one that writes to them fails loudly.
  let text: string | null | undefined;
  let headers: Record<string, unknown> = {};
  const messages = rows.map((row) => {
    if (row.headers !== text) headers = Object.freeze(headersOf((text = row.headers)));
    return toMessage(row, outbox, headers);
  });
  return { messages, fence: { ownerEpoch, intervalSeq, readCursor, generation } };
}

/**
 * The most messages one read asks for: max_batch_size (`configured`), else GROWN_BATCH_SIZE for a
 * sink that grows batches, else batch_size. Below batch_size it is refused, naming `pipeline`.
 */
export function maxBatchSize(pipeline: string, batchSize: number, configured: number | undefined, growBatches: boolean | undefined): number {
  const max = configured ?? (growBatches ? Math.max(batchSize, GROWN_BATCH_SIZE) : batchSize);
  if (max < batchSize) {
    throw new ConfigError(`pipeline "${pipeline}": 'max_batch_size' (${max}) is below its batch_size (${batchSize}); ` +
      `raise it, or leave it out to read batch_size messages at a time`);
  }
  return max;
}

/**
 * The read limit after `batch`, read with `limit`: doubled after a full batch, up to `maxLimit` and
 * as long as the next batch would stay under GROWN_BATCH_BYTES of payload; back to `batchSize` once
 * a batch is not full (the backlog is gone: small batches keep latency low).
 */
export function nextLimit(batch: OutboxMessage[], full: boolean, limit: number, maxLimit: number, batchSize: number): number {
  let bytes = 0;
  for (const message of batch) bytes += payloadSize(message);
  handled(bytes);
  if (!full) return batchSize;
  if (limit >= maxLimit) return limit;
  return bytes * 2 <= GROWN_BATCH_BYTES ? Math.min(limit * 2, maxLimit) : limit;
}

/**
 * The messages of `batch` that pass the filter, and those it could not decide on (a missing field,
 * a non-bool result). Each undecided one is reported to `failed` (metric, last_error) and skipped,
 * or, with transform.on_error = "dead_letter", returned to be dead-lettered with the batch's
 * acknowledgement (one transaction: read again after a crash, it is decided again, never recorded twice).
 */
export function matchFilter(filter: FilterFn, batch: OutboxMessage[], failed: (error: Error) => void): { matching: OutboxMessage[]; undecided: DeadLetter[] } {
  const matching: OutboxMessage[] = [];
  const undecided: DeadLetter[] = [];
  for (const message of batch) {
    const { match, error } = filter.evaluate({ payload: message.payload, headers: message.headers, topic: message.topic, op: message.op });
    if (match) matching.push(message);
    if (!error) continue;
    failed(error);
    if (filter.errorPolicy === "dead_letter") undecided.push({ message, error: error.message, attempts: 1 });
  }
  return { matching, undecided };
}

/** What one batch's delivery has decided so far: attempts spent per message, dead letters, parked messages. */
export interface Undelivered {
  attempts: Map<bigint, number>;
  dead: DeadLetter[];
  parked: Parked[];
}

/**
 * Sorts the `failures` of one publish of `pending`: the messages to publish again (and whether the
 * whole call looked like an outage); the others spend an attempt and go to `so.dead` (permanent, or
 * after `maxAttempts`, 0 for no limit) or, with isolate_poison (`keys`: each message's key), to
 * `so.parked`, together with the messages to retry whose key is parked. `untried`: every message to
 * publish again was held back untried behind one that is now dead-lettered or parked, so there is
 * nothing to wait for before sending them.
 */
export function sortFailures(pending: OutboxMessage[], failures: DeliveryFailure[], keys: Map<bigint, string> | undefined,
  maxAttempts: number, so: Undelivered): { retry: OutboxMessage[]; outage: boolean; untried: boolean } {
  const { attempts, dead, parked } = so;
  const failed = new Map(failures.map((f) => [f.id, f]));
  // An outage, not a bad message: every message tried failed, none went through, and each may
  // succeed later (connection errors, 5xx, timeouts). It is retried like a thrown error, without
  // spending anyone's attempts. A message spends its attempts only when it fails while others in
  // the same call succeed, when the target refused it (DeliveryFailure.refused), or when its
  // failure is permanent.
  const tried = pending.filter((m) => !failed.get(m.id)?.heldBack);
  const outage = tried.length > 0 && tried.every((m) => failed.get(m.id)?.retriable && !failed.get(m.id)?.refused);
  const retry: OutboxMessage[] = [];
  for (const message of pending) {
    const failure = failed.get(message.id);
    if (!failure) continue;
    if (failure.heldBack || (outage && failure.retriable)) {
      retry.push(message); // not tried, or tried during an outage: no attempt spent
      continue;
    }
    const count = (attempts.get(message.id) ?? 0) + 1;
    attempts.set(message.id, count);
    const budgetSpent = maxAttempts > 0 && count >= maxAttempts;
    if (!failure.retriable || budgetSpent) {
      dead.push({ message, error: failure.error.message, attempts: count });
    } else if (keys) {
      // A message of its own that keeps failing: parked, with its key's later messages below.
      parked.push({ message, key: keys.get(message.id)!, error: failure.error.message, attempts: count });
    } else {
      retry.push(message);
    }
  }
  if (keys && parked.length > 0) {
    const parkedKeys = new Set(parked.map((p) => p.key));
    for (const message of retry.splice(0)) {
      if (parkedKeys.has(keys.get(message.id)!)) parked.push({ message, key: keys.get(message.id)!, error: null, attempts: 0 });
      else retry.push(message);
    }
  }
  const untried = retry.length > 0 && !outage && retry.every((m) => failed.get(m.id)?.heldBack);
  return { retry, outage, untried };
}
