// One forward pipeline: read the next batch of its consumer group, filter, hand it to the sink,
// retry what failed, dead-letter what cannot be delivered, and only then move the position.
// The position moves after the sink acknowledged, so a crash re-delivers at most one batch.

import type { Sql } from "./db.ts";
import { sleep, TIMED_OUT, Wakeup, within, type BackoffPolicy } from "./backoff.ts";
import { ConfigError } from "./errors.ts";
import type { FilterFn } from "./filter.ts";
import type { Formatter } from "./wire_format.ts";
import type { RelayEvents } from "./events.ts";
import { WorkerStatus } from "./worker_status.ts";
import type { Logger } from "./log.ts";
import type { OutboxMessage, SinkInstance } from "./plugin.ts";
import { preparePipeline } from "./pipeline_config.ts";
import { pluginContext, type PluginRegistry } from "./plugins.ts";
import { eventTypeOf, opOf } from "./template.ts";

export interface PipelineRow {
  name: string;
  direction: "forward" | "reverse";
  outbox_name: string | null;
  consumer_group: string | null;
  inbox_name: string | null;
  plugin_type: string;
  config: Record<string, any>;
  batch_size: number;
  enabled: boolean;
  idempotent: boolean;
  updated_at: Date;
}

export { WorkerStatus } from "./worker_status.ts";

export interface ForwardOptions {
  sql: Sql;
  postgresUrl?: string;
  registry: PluginRegistry;
  logger: Logger;
  relayGroupId: string;
  pollIntervalMs: number;
  events?: RelayEvents;
}

/** 0: retry a transiently failing message until it is delivered (webhooks: "until 2xx"). */
export const DEFAULT_MAX_ATTEMPTS = 0;

export class ForwardWorker {
  readonly status: WorkerStatus;
  readonly #row: PipelineRow;
  readonly #options: ForwardOptions;
  readonly #log: Logger;
  readonly #wakeup = new Wakeup();
  /** Stops the loop between batches: in-flight deliveries finish (drain). */
  readonly #stopping = new AbortController();
  /** Aborts the sink itself: only when draining took too long. */
  readonly #abort = new AbortController();
  #sink: SinkInstance | undefined;
  #filter: FilterFn | undefined;
  #format: Formatter | undefined;
  #loop: Promise<void> | undefined;
  #retry: BackoffPolicy & { maxAttempts: number };
  #pauseOnFailure: boolean;
  /** consumer_groups.generation when the batch being delivered was read (see consumer_commit). */
  #generation = 0n;
  #redeliverDeadLetters = true;

  constructor(row: PipelineRow, options: ForwardOptions) {
    this.#row = row;
    this.#options = options;
    this.#log = options.logger.child({ pipeline: row.name });
    this.status = new WorkerStatus(row.name, "forward", this.#log, options.events);
    const retry = row.config.retry ?? {};
    this.#retry = {
      initialMs: retry.initial_backoff_ms ?? 200,
      maxMs: retry.max_backoff_ms ?? 30_000,
      maxAttempts: retry.max_attempts ?? DEFAULT_MAX_ATTEMPTS,
    };
    this.#pauseOnFailure = row.config.on_failure === "pause";
  }

  get name(): string {
    return this.#row.name;
  }

  get outbox(): string {
    return this.#row.outbox_name!;
  }

  get updatedAt(): number {
    return new Date(this.#row.updated_at).getTime();
  }

  /** Validates and builds the sink (no I/O), then starts the delivery loop. */
  async start(): Promise<void> {
    const prepared = await preparePipeline(this.#row, this.#options.registry, {
      onError: (error) => this.#log.debug("filter did not match", { error }),
    });
    this.#filter = prepared.filter;
    this.#format = prepared.format;
    const ctx = pluginContext(this.#row.name, this.#log, this.#abort.signal, this.#row.batch_size, this.#options.postgresUrl);
    if (prepared.definition.kind !== "sink") throw new ConfigError(`pipeline "${this.#row.name}": not a sink`);
    this.#sink = prepared.definition.create(prepared.pluginConfig, ctx);
    this.#loop = this.#run();
  }

  /** New messages may be there: end the idle wait now. */
  wake(): void {
    this.#wakeup.set();
  }

  /** Dead letters were requeued: deliver them on the next turn. */
  requeue(): void {
    this.#redeliverDeadLetters = true;
    this.#wakeup.set();
  }

  /**
   * Finishes the in-flight batch (up to drainMs), then closes the sink. A sink that ignores the
   * abort at drainMs is left behind ABANDON_MS later: its batch stays unacknowledged, so the next
   * owner delivers it again, and stopping never hangs on a sink.
   */
  async stop(drainMs = 10_000): Promise<void> {
    this.#stopping.abort();
    const timer = setTimeout(() => this.#abort.abort(), drainMs);
    try {
      if ((await within(this.#loop ?? Promise.resolve(), drainMs + ABANDON_MS)) === TIMED_OUT) {
        this.#log.warn("the sink did not stop when aborted; its batch is left unacknowledged", { abandoned_after_ms: drainMs + ABANDON_MS });
      }
    } finally {
      clearTimeout(timer);
      this.#abort.abort();
      const closing = this.#sink?.close().catch((error) => this.#log.warn("closing the sink failed", { error }));
      if (closing && (await within(closing, ABANDON_MS)) === TIMED_OUT) this.#log.warn("closing the sink did not finish; left behind");
    }
  }

  async #run(): Promise<void> {
    const stop = this.#stopping.signal;
    await this.#connect();
    while (!stop.aborted) {
      try {
        if (this.#redeliverDeadLetters) {
          this.#redeliverDeadLetters = false;
          await this.#redeliverRequeued().catch((error) => {
            this.#redeliverDeadLetters = true; // try again on the next turn
            throw error;
          });
        }
        // The group's generation comes with the batch, so that an acknowledgement racing a rewind
        // is ignored. Read in the statement's snapshot it can only be older than the one the batch
        // came from, which makes the acknowledgement a no-op and the batch is read again: a
        // duplicate, never a loss. A group row created by this very call starts at 0.
        const { relayGroupId } = this.#options;
        const { outbox_name: outbox, consumer_group: group } = this.#row;
        const rows = await this.#options.sql<(MessageRow & { generation: bigint })[]>`
          SELECT b.id, b.outbox, b.topic, b.payload, b.headers, b.created_at,
                 coalesce((SELECT generation FROM tide.consumer_groups
                            WHERE outbox_name = ${outbox} AND group_name = ${group}
                              AND relay_group_id = ${relayGroupId}), 0) AS generation
            FROM tide.consumer_next_batch(${outbox}, ${group}, ${this.#row.batch_size}, ${relayGroupId}) b`;
        if (rows.length === 0) {
          this.status.waiting = true;
          await this.#wakeup.wait(this.#row.config.poll_interval_ms ?? this.#options.pollIntervalMs, stop);
          this.status.waiting = false;
          continue;
        }
        this.#generation = rows[0].generation;
        const delivered = await this.#deliver(rows.map(toMessage));
        if (!delivered) continue; // stopping or paused: the batch stays unacknowledged
      } catch (error) {
        this.status.fail(error, "reading or acknowledging the outbox failed");
        await sleep(this.status.retryDelay(this.#retry), stop);
      }
    }
  }

  async #connect(): Promise<void> {
    const stop = this.#stopping.signal;
    while (!stop.aborted) {
      try {
        await this.#sink!.connect();
        this.status.succeed();
        return;
      } catch (error) {
        this.status.fail(error, "connecting the sink failed");
        await sleep(this.status.retryDelay(this.#retry), stop);
      }
    }
  }

  /** Delivers a batch with retries; true once it is acknowledged (position moved). */
  async #deliver(batch: OutboxMessage[]): Promise<boolean> {
    const stop = this.#stopping.signal;
    const matching = this.#filter ? batch.filter((m) => this.#matches(m)) : batch;
    const passing = this.#format ? matching.map(this.#format) : matching;
    const attempts = new Map<bigint, number>();
    const dead: { message: OutboxMessage; error: string; attempts: number }[] = [];
    let pending = passing;
    while (pending.length > 0) {
      let failures;
      try {
        failures = await this.#sink!.publish(pending);
      } catch (error) {
        // The whole batch failed (target down): keep it in the outbox and retry without a budget.
        this.status.fail(error, "delivery failed", { batch: pending.length });
        if (stop.aborted) return false;
        await sleep(this.status.retryDelay(this.#retry), stop);
        if (stop.aborted) return false;
        continue;
      }
      const failed = new Map(failures.map((f) => [f.id, f]));
      const retry: OutboxMessage[] = [];
      for (const message of pending) {
        const failure = failed.get(message.id);
        if (!failure) continue;
        if (failure.heldBack) {
          retry.push(message); // not tried: no attempt spent
          continue;
        }
        const count = (attempts.get(message.id) ?? 0) + 1;
        attempts.set(message.id, count);
        const budgetSpent = this.#retry.maxAttempts > 0 && count >= this.#retry.maxAttempts;
        if (!failure.retriable || budgetSpent) {
          dead.push({ message, error: failure.error.message, attempts: count });
        } else {
          retry.push(message);
        }
      }
      if (dead.length > 0 && this.#pauseOnFailure) {
        // The position stops right before the message: everything earlier in the batch is
        // acknowledged, and the pipeline waits for its config to change (or to be stopped).
        // Messages still waiting for a retry are not delivered either: the position stops before
        // the first of them too.
        const blocked = [...dead.map((d) => d.message.id), ...retry.map((m) => m.id)]
          .reduce((low, id) => (id < low ? id : low));
        const before = batch.filter((m) => m.id < blocked);
        if (before.length > 0) await this.#acknowledge(before, []);
        this.status.fail(new Error(dead[0].error), "paused: a message cannot be delivered (on_failure = pause)", { id: String(blocked) });
        await new Promise<void>((resolve) => stop.addEventListener("abort", () => resolve(), { once: true }));
        return false;
      }
      pending = retry;
      if (pending.length > 0) {
        this.status.fail(failures[0].error, "some messages failed; retrying them", { failed: pending.length });
        await sleep(this.status.retryDelay(this.#retry), stop);
        if (stop.aborted) return false;
      }
    }
    await this.#acknowledge(batch, dead);
    this.status.delivered += passing.length - dead.length;
    this.status.filtered += batch.length - passing.length;
    this.status.succeed();
    const deadIds = new Set(dead.map((d) => d.message.id));
    this.#options.events?.delivered?.(this.#row.name, deadIds.size ? passing.filter((m) => !deadIds.has(m.id)) : passing);
    if (batch.length > passing.length) this.#options.events?.filtered?.(this.#row.name, batch.length - passing.length);
    return true;
  }

  async #acknowledge(batch: OutboxMessage[], dead: { message: OutboxMessage; error: string; attempts: number }[]) {
    const last = batch[batch.length - 1].id;
    let rewound = false;
    await this.#options.sql.begin(async (tx) => {
      for (const entry of dead) {
        await tx`SELECT tide.relay_dlq_add(${this.#row.name}, ${entry.message.id}, ${entry.error}, ${entry.attempts})`;
      }
      const [{ moved }] = await tx`
        SELECT tide.consumer_commit(${this.#row.outbox_name}, ${this.#row.consumer_group}, ${last}, ${batch.length},
                                    ${this.#options.relayGroupId}, ${this.#generation}) AS moved`;
      rewound = !moved;
    });
    if (rewound) this.#log.info("the consumer group was moved while this batch was delivered; reading from its new position");
    if (dead.length > 0) {
      this.status.deadLettered += dead.length;
      this.#options.events?.deadLettered?.(this.#row.name, dead.length);
      this.#log.warn("messages moved to the dead-letter queue", { count: dead.length, first_error: dead[0].error });
    }
  }

  /** Dead letters an operator requeued (tide.relay_dlq_requeue) are delivered once more. */
  async #redeliverRequeued(): Promise<void> {
    const rows = await this.#options.sql<(MessageRow & { dlq_id: bigint })[]>`
      SELECT id AS dlq_id, message_id AS id, outbox_name AS outbox, topic, payload, headers,
             coalesce(message_created_at, failed_at) AS created_at
        FROM tide.relay_dlq WHERE pipeline = ${this.#row.name} AND status = 'requeued' ORDER BY id LIMIT 1000`;
    if (rows.length === 0) return;
    const messages = rows.map(toMessage);
    const failures = await this.#sink!.publish(this.#format ? messages.map(this.#format) : messages);
    const failed = new Set(failures.map((f) => f.id));
    const done = rows.filter((row) => !failed.has(row.id)).map((row) => String(row.dlq_id));
    const again = rows.filter((row) => failed.has(row.id)).map((row) => String(row.dlq_id));
    const sql = this.#options.sql;
    await sql`UPDATE tide.relay_dlq SET status = 'redelivered', updated_at = now() WHERE id = ANY(${sql.array(done)}::bigint[])`;
    await sql`UPDATE tide.relay_dlq SET status = 'open', attempts = attempts + 1, updated_at = now()
               WHERE id = ANY(${sql.array(again)}::bigint[])`;
    this.#log.info("requeued dead letters delivered", { delivered: done.length, failed: again.length });
  }

  #matches(message: OutboxMessage): boolean {
    return this.#filter!({ payload: message.payload, headers: message.headers, topic: message.topic, op: message.op });
  }

}

interface MessageRow {
  id: bigint;
  outbox: string;
  topic: string | null;
  payload: unknown;
  headers: Record<string, unknown>;
  created_at: Date;
}

export function toMessage(row: MessageRow): OutboxMessage {
  const headers = row.headers ?? {};
  return {
    id: row.id,
    outbox: row.outbox,
    topic: row.topic,
    payload: row.payload,
    headers,
    dedupKey: `${row.outbox}:${row.id}`,
    eventType: eventTypeOf(headers, row.payload),
    op: opOf(headers, row.payload),
    createdAt: row.created_at,
  };
}

/** How long a sink gets to react to an abort (or to close) before the worker stops waiting for it. */
const ABANDON_MS = 5_000;
