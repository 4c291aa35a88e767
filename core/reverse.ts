// One reverse pipeline: read batches from a source, filter them, write them into the inbox table in
// one transaction, and acknowledge to the source only after that commit. A crash before the commit
// means the source delivers again; the inbox's unique event_id turns the repeat into a no-op.

import { sleep } from "./backoff.ts";
import type { Sql } from "./db.ts";
import { ConfigError, toError } from "./errors.ts";
import type { FilterFn } from "./filter.ts";
import type { PipelineRow } from "./forward.ts";
import { WorkerStatus } from "./worker_status.ts";
import type { RelayEvents } from "./events.ts";
import type { Logger } from "./log.ts";
import type { HttpRoutes, InboundMessage, OutboxMessage, SourceInstance } from "./plugin.ts";
import { preparePipeline } from "./pipeline_config.ts";
import { pluginContext, type PluginRegistry } from "./plugins.ts";

export interface ReverseOptions {
  sql: Sql;
  postgresUrl?: string;
  http?: HttpRoutes;
  registry: PluginRegistry;
  logger: Logger;
  events?: RelayEvents;
}


export class ReverseWorker {
  readonly status: WorkerStatus;
  readonly #row: PipelineRow;
  readonly #options: ReverseOptions;
  readonly #log: Logger;
  readonly #stopping = new AbortController();
  #source: SourceInstance | undefined;
  #filter: FilterFn | undefined;
  #eventIdTemplate: ((message: OutboxMessage) => string) | undefined;
  #loop: Promise<void> | undefined;
  duplicates = 0;

  constructor(row: PipelineRow, options: ReverseOptions) {
    this.#row = row;
    this.#options = options;
    this.#log = options.logger.child({ pipeline: row.name });
    this.status = new WorkerStatus(row.name, "reverse", this.#log, options.events);
  }

  get name(): string {
    return this.#row.name;
  }

  get outbox(): string | null {
    return null;
  }

  get updatedAt(): number {
    return new Date(this.#row.updated_at).getTime();
  }

  async start(): Promise<void> {
    const prepared = await preparePipeline(this.#row, this.#options.registry);
    if (prepared.definition.kind !== "source") throw new ConfigError(`pipeline "${this.#row.name}": not a source`);
    this.#filter = prepared.filter;
    this.#eventIdTemplate = prepared.eventId;
    const ctx = pluginContext(this.#row.name, this.#log, this.#stopping.signal, this.#row.batch_size, this.#options.postgresUrl, this.#options.http);
    this.#source = prepared.definition.create(prepared.pluginConfig, ctx);
    this.#loop = this.#run();
  }

  wake(): void {}

  requeue(): void {}

  async stop(_drainMs = 10_000): Promise<void> {
    this.#stopping.abort();
    await this.#loop;
    await this.#source?.close().catch((error) => this.#log.warn("closing the source failed", { error }));
  }

  async #run(): Promise<void> {
    const stop = this.#stopping.signal;
    while (!stop.aborted) {
      try {
        await this.#source!.connect();
        this.status.succeed();
        break;
      } catch (error) {
        this.status.fail(error, "connecting the source failed");
        await sleep(this.status.retryDelay(), stop);
      }
    }
    while (!stop.aborted) {
      let batch;
      try {
        batch = await this.#source!.read();
      } catch (error) {
        this.status.fail(error, "reading from the source failed");
        await sleep(this.status.retryDelay(), stop);
        continue;
      }
      if (batch === null) break;
      if (batch.messages.length === 0) {
        await batch.ack();
        continue;
      }
      try {
        await this.#write(batch.messages);
      } catch (error) {
        this.status.fail(error, "writing to the inbox failed; the source will deliver again", { batch: batch.messages.length });
        await batch.nack?.(toError(error)).catch(() => {});
        await sleep(this.status.retryDelay(), stop);
        continue;
      }
      try {
        await batch.ack();
        this.status.succeed();
      } catch (error) {
        // Committed already: a redelivery is deduplicated by event_id.
        this.status.fail(error, "acknowledging to the source failed after the inbox commit");
      }
    }
  }

  async #write(messages: InboundMessage[]): Promise<void> {
    const inbox = this.#row.inbox_name!;
    const rows = [];
    for (const message of messages) {
      if (this.#filter && !this.#filter({ payload: message.payload, headers: message.headers, topic: null, op: "publish" })) {
        this.status.filtered += 1;
        this.#options.events?.filtered?.(this.#row.name, 1);
        continue;
      }
      rows.push({
        event_id: withoutNul(this.#eventIdOf(message, inbox)),
        source: withoutNul(message.source),
        payload: withoutNul(message.payload ?? null),
        headers: withoutNul(message.headers ?? {}),
      });
    }
    if (rows.length === 0) return;
    const [result] = await this.#options.sql<{ inserted: number; duplicates: number }[]>`
      SELECT * FROM tide.inbox_insert_batch(${inbox}, ${this.#options.sql.json(rows as any)})`;
    this.status.delivered += result.inserted;
    this.duplicates += result.duplicates;
    this.status.succeed();
    this.#options.events?.consumed?.(this.#row.name, result.inserted, result.duplicates);
  }

  /** A configured template wins, then the message's own id, then its place in the transport. */
  #eventIdOf(message: InboundMessage, inbox: string): string {
    if (this.#eventIdTemplate) {
      const rendered = this.#eventIdTemplate({
        id: 0n, outbox: inbox, topic: null, payload: message.payload, headers: message.headers,
        dedupKey: "", eventType: "", op: "publish", createdAt: new Date(),
      });
      if (rendered !== "") return rendered;
    }
    return message.eventId ?? `${inbox}:${message.transportId}`;
  }

}

/**
 * PostgreSQL text and jsonb cannot hold U+0000. One such message would fail its whole batch again
 * and again and hold up every message behind it, so the character becomes U+FFFD (in keys too).
 */
export function withoutNul<T>(value: T): T {
  if (typeof value === "string") return (value.includes("\u0000") ? value.replaceAll("\u0000", "\uFFFD") : value) as T;
  if (Array.isArray(value)) return value.map(withoutNul) as T;
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [withoutNul(k), withoutNul(v)])) as T;
  }
  return value;
}
