// isolate_poison for one forward worker (one lane): the keys that have parked messages
// (tide.relay_held), when the next parked message is due for a retry, and that retry. A message that
// keeps failing is parked with its key's later messages, so other keys flow on; a parked key goes on
// once its oldest message went through or was dead-lettered. The worker decides what to park (its
// acknowledgement records it, core/engine/dead_letters.ts); this object knows which keys are held.

import type { Sql } from "../db.ts";
import { backoffDelay } from "./backoff.ts";
import type { RetryPolicy } from "../config/engine_config.ts";
import type { RelayEvents } from "./events.ts";
import type { Logger } from "../log.ts";
import type { OutboxMessage, SinkInstance } from "../plugin.ts";
import type { Formatter } from "../config/wire_format.ts";
import { redactText } from "../redact.ts";
import type { WorkerStatus } from "./worker_status.ts";
import { toMessage, type MessageRow, type Parked } from "./forward_batch.ts";

/** Whose parked messages: the rows of tide.relay_held with this pipeline, relay group and lane. */
export interface HeldWhere {
  pipeline: string;
  group: string;
  lane: number;
}

export class HeldKeys {
  readonly #sql: Sql;
  readonly #where: HeldWhere;
  readonly #status: WorkerStatus;
  readonly #log: Logger;
  readonly #events: RelayEvents | undefined;
  /** Keys with parked messages (loaded at takeover): a message of one is parked behind them. */
  #keys: Set<string> | undefined;
  /** When the oldest parked message of some key is due for its next attempt (Date.now()). */
  #dueAt = Infinity;

  constructor(sql: Sql, where: HeldWhere, status: WorkerStatus, log: Logger, events?: RelayEvents) {
    this.#sql = sql;
    this.#where = where;
    this.#status = status;
    this.#log = log;
    this.#events = events;
  }

  /** When the next parked message is due for a retry (Date.now()); Infinity when none is parked. */
  get dueAt(): number {
    return this.#dueAt;
  }

  /** True when the parked keys are not loaded yet, or a parked message is due for its retry. */
  due(): boolean {
    return this.#keys === undefined || Date.now() >= this.#dueAt;
  }

  /**
   * `messages` split into those that go out and those parked behind their key's parked messages
   * (unsent, no attempt spent); `keys` has each message's key.
   */
  split(messages: OutboxMessage[], keys: Map<bigint, string>): { passing: OutboxMessage[]; parked: Parked[] } {
    const parked: Parked[] = [];
    if (!this.#keys?.size) return { passing: messages, parked };
    const passing: OutboxMessage[] = [];
    for (const message of messages) {
      const key = keys.get(message.id)!;
      if (this.#keys.has(key)) parked.push({ message, key, error: null, attempts: 0 });
      else passing.push(message);
    }
    return { passing, parked };
  }

  /** `parked` was recorded with an acknowledgement: their keys are held, retried after the first backoff. */
  parked(parked: Parked[], retry: RetryPolicy): void {
    if (parked.length === 0) return;
    for (const { key } of parked) this.#keys?.add(key);
    this.#dueAt = Math.min(this.#dueAt, Date.now() + backoffDelay(1, retry));
    const keys = [...new Set(parked.filter((p) => p.error !== null).map((p) => p.key))];
    if (keys.length > 0) {
      this.#log.warn("messages that keep failing are parked with their key's later ones; other keys flow on", {
        keys: keys.length, parked: parked.length, first_error: parked.find((p) => p.error !== null)?.error,
      });
    }
  }

  /**
   * Retries the oldest parked message of every key that is due, one key at a time in message order,
   * through `sink` (with the pipeline's wire `format`); a key whose message went through (or was dead-lettered after
   * retry.max_attempts) goes on with its next one at once, and is released once none is left. Then
   * reloads which keys are parked and when the next retry is due. Ends early once `stopping()` (no
   * new round) or `cutOff()` (nothing more is published or recorded).
   */
  async retry(sink: SinkInstance, format: Formatter | undefined, policy: RetryPolicy, stopping: () => boolean,
    cutOff: () => boolean): Promise<void> {
    const sql = this.#sql;
    const where = this.#where;
    for (let progress = true; progress && !stopping();) {
      progress = false;
      const due = await sql<(MessageRow & { key: string; attempts: number })[]>`
        SELECT * FROM (
          SELECT DISTINCT ON (key) key, message_id AS id, outbox_name AS outbox, topic, payload::text AS payload,
                 headers::text AS headers, coalesce(message_created_at, held_at) AS created_at, attempts, next_attempt_at
            FROM tide.relay_held
           WHERE pipeline = ${where.pipeline} AND relay_group_id = ${where.group} AND lane = ${where.lane}
           ORDER BY key, message_id) oldest
         WHERE next_attempt_at <= now()`;
      for (const row of due) {
        if (cutOff()) return;
        const message = toMessage(row, row.outbox);
        let failure;
        try {
          [failure] = await sink.publish([format ? format(message) : message]);
        } catch (error) {
          this.#status.fail(error, "retrying a parked message failed; the target looks down");
          break; // an outage spends no attempt: tried again when due
        }
        if (cutOff()) return;
        const attempts = row.attempts + 1;
        const dead = failure !== undefined && (!failure.retriable || (policy.maxAttempts > 0 && attempts >= policy.maxAttempts));
        const retryAt = new Date(Date.now() + backoffDelay(attempts, policy));
        await sql`SELECT tide.relay_held_settle(${where.pipeline}, ${where.group}, ${where.lane}, ${row.id},
                                                ${failure ? redactText(failure.error.message) : null}, ${retryAt}, ${dead})`;
        if (!failure) this.#status.delivered += 1;
        if (dead) {
          this.#status.deadLettered += 1;
          this.#events?.deadLettered?.(where.pipeline, 1);
          this.#log.warn("a parked message moved to the dead-letter queue; its key goes on", { id: String(row.id), attempts });
        }
        progress ||= !failure || dead;
      }
    }
    const [state] = await sql<{ keys: string[]; due: Date | null }[]>`
      SELECT coalesce(array_agg(DISTINCT key), '{}') AS keys, min(next_attempt_at) AS due FROM tide.relay_held
       WHERE pipeline = ${where.pipeline} AND relay_group_id = ${where.group} AND lane = ${where.lane}`;
    this.#keys = new Set(state.keys);
    this.#dueAt = state.due === null ? Infinity : new Date(state.due).getTime();
  }
}
