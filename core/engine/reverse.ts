// One reverse pipeline: read batches from a source, filter them, write them into the inbox table in
// one transaction, and acknowledge to the source only after that commit. A crash before the commit
// means the source delivers again; the inbox's unique event_id turns the repeat into a no-op.
// The acknowledgement to the source is given only by the current owner: a worker that was fenced, or
// whose relay no longer holds the pipeline's lock, leaves the message unacknowledged for the source
// to deliver again to the new owner (where the inbox deduplicates it).

import { sleep, type BackoffPolicy } from "./backoff.ts";
import { connectPlugin, drainAndClose } from "./worker_lifecycle.ts";
import { failpoint } from "./failpoints.ts";
import type { Sql } from "../db.ts";
import { ConfigError, toError } from "../errors.ts";
import { boundEventId } from "../config/event_id.ts";
import type { FilterFn } from "../config/filter.ts";
import type { PipelineRow } from "../pipeline.ts";
import { WorkerStatus } from "./worker_status.ts";
import type { RelayEvents } from "./events.ts";
import type { Logger } from "../log.ts";
import { stringifyJson } from "../json.ts";
import { outboxMessage } from "../message.ts";
import type { HttpRoutes, InboundMessage, OutboxMessage, SourceInstance } from "../plugin.ts";
import { preparePipeline } from "../config/pipeline_config.ts";
import { pluginContext, type PluginRegistry } from "../plugins.ts";

export interface ReverseOptions {
  sql: Sql;
  postgresUrl?: string;
  http?: HttpRoutes;
  registry: PluginRegistry;
  logger: Logger;
  events?: RelayEvents;
  /** Whether this relay still owns the pipeline (asked before every acknowledgement to the source). */
  stillOwner?: () => Promise<boolean>;
}


export class ReverseWorker {
  readonly status: WorkerStatus;
  readonly #row: PipelineRow;
  readonly #options: ReverseOptions;
  readonly #log: Logger;
  /** Stops the loop between batches: the batch in flight is written and acknowledged (drain). */
  readonly #stopping = new AbortController();
  /** Aborts the source itself: when draining took too long, or at once when fenced. */
  readonly #abort = new AbortController();
  #fenced = false;
  /** True while waiting in source.read(): no batch is in flight then. */
  #reading = false;
  /** The pipeline's retry backoff, from its checked config (start()). */
  #retry!: BackoffPolicy;
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
    if (prepared.definition.kind !== "source" || prepared.engine.direction !== "reverse") {
      throw new ConfigError(`pipeline "${this.#row.name}": not a source`);
    }
    this.#retry = prepared.engine.retry;
    this.#filter = prepared.filter;
    this.#eventIdTemplate = prepared.eventId;
    const ctx = pluginContext(this.#row.name, this.#log, this.#abort.signal, this.#row.batch_size, this.#options.postgresUrl, this.#options.http);
    this.#source = prepared.definition.create(prepared.pluginConfig, ctx);
    this.#loop = this.#run();
  }

  wake(): void {}

  requeue(): void {}

  /** Ownership is in doubt: abort the source at once; nothing is acknowledged after this. */
  fence(): void {
    this.#fenced = true;
    this.#stopping.abort();
    this.#abort.abort();
  }

  /**
   * Lets the batch in flight finish (up to drainMs), then closes the source. A source that ignores
   * the abort is left behind ABANDON_MS later; its batch is not acknowledged and comes again.
   */
  async stop(drainMs = 10_000): Promise<void> {
    this.#stopping.abort();
    // Waiting for a batch holds nothing in flight: the source may stop at once.
    if (this.#reading) this.#abort.abort();
    await drainAndClose(this.#loop, this.#abort, drainMs, () => this.#source?.close(), "source", this.#log);
  }

  async #run(): Promise<void> {
    const stop = this.#stopping.signal;
    await connectPlugin(() => this.#source!.connect(), "source", this.status, this.#retry, stop);
    while (!stop.aborted) {
      let batch;
      try {
        this.#reading = true;
        batch = await this.#source!.read();
      } catch (error) {
        if (this.#abort.signal.aborted) break;
        this.status.fail(error, "reading from the source failed");
        await sleep(this.status.retryDelay(this.#retry), stop);
        continue;
      } finally {
        this.#reading = false;
      }
      if (batch === null) break;
      if (batch.messages.length > 0) {
        try {
          await this.#write(batch.messages);
        } catch (error) {
          this.status.fail(error, "writing to the inbox failed; the source will deliver again", { batch: batch.messages.length });
          await batch.nack?.(toError(error)).catch((nackError) =>
            this.#log.warn("returning the batch to the source failed; it comes again when the source redelivers", {
              error: toError(nackError),
            }));
          await sleep(this.status.retryDelay(this.#retry), stop);
          continue;
        }
        await failpoint("reverse.after-inbox-commit");
      }
      if (!(await this.#mayAcknowledge(batch.messages.length > 0))) {
        this.#log.warn("not acknowledging to the source: this relay no longer owns the pipeline; " +
          "the source delivers the batch again to the new owner", { batch: batch.messages.length });
        break;
      }
      try {
        await batch.ack();
        if (batch.messages.length > 0) this.status.succeed();
      } catch (error) {
        // Committed already: a redelivery is deduplicated by event_id.
        this.status.fail(error, "acknowledging to the source failed after the inbox commit");
      }
    }
  }

  /** Only the current owner acknowledges: not after a fence or an abort, not after losing the lock. */
  async #mayAcknowledge(wroteMessages: boolean): Promise<boolean> {
    if (this.#fenced || this.#abort.signal.aborted) return false;
    if (!wroteMessages || !this.#options.stillOwner) return true;
    const owner = await this.#options.stillOwner().catch(() => false);
    return owner && !this.#fenced && !this.#abort.signal.aborted;
  }

  async #write(messages: InboundMessage[]): Promise<void> {
    const inbox = this.#row.inbox_name!;
    const rows: InboxRow[] = [];
    for (const message of messages) {
      // The payload's text as the source delivered it; filters and templates see it parsed (losslessly).
      const payloadText = message.payloadText ?? stringifyJson(message.payload ?? null);
      const view = outboxMessage({
        id: 0n, outbox: inbox, topic: null, payload: payloadText, headers: message.headers ?? {}, createdAt: new Date(), eventType: "", op: "publish",
      });
      if (this.#filter) {
        // A message the filter cannot decide on is counted and shown (metric, last_error), then
        // skipped: a reverse pipeline has no dead-letter queue of its own.
        const { match, error } = this.#filter.evaluate({ payload: view.payload, headers: view.headers, topic: null, op: "publish" });
        if (error) this.status.filterFailed(error);
        if (!match) {
          this.status.filtered += 1;
          this.#options.events?.filtered?.(this.#row.name, 1);
          continue;
        }
      }
      rows.push({
        eventId: withoutNul(this.#eventIdOf(message, inbox, view)),
        source: withoutNul(message.source),
        payloadText: withoutNulEscapes(payloadText),
        headers: stringifyJson(withoutNul(message.headers ?? {})),
      });
    }
    if (rows.length === 0) return;
    // Each payload's text is cast to jsonb by PostgreSQL as it came, never parsed and re-written here.
    const sql = this.#options.sql;
    const insert = async () => (await sql<{ inserted: number; duplicates: number }[]>`
      SELECT * FROM tide.inbox_insert_batch(${inbox}, (
        SELECT jsonb_agg(jsonb_build_object('event_id', e, 'source', s, 'payload', p::jsonb, 'headers', h::jsonb) ORDER BY n)
          FROM unnest(${sql.array(rows.map((r) => r.eventId))}::text[], ${sql.array(rows.map((r) => r.source))}::text[],
                      ${sql.array(rows.map((r) => r.payloadText))}::text[], ${sql.array(rows.map((r) => r.headers))}::text[])
               WITH ORDINALITY AS m(e, s, p, h, n)))`)[0]!;
    const result = await insert().catch(async (error) => {
      if (!isDataException(error) || !(await this.#quoteRefusedPayloads(rows))) throw error;
      return await insert();
    });
    this.status.delivered += result.inserted;
    this.duplicates += result.duplicates;
    this.status.succeed();
    this.#options.events?.consumed?.(this.#row.name, result.inserted, result.duplicates);
  }

  /**
   * JSON that JavaScript accepts but PostgreSQL's jsonb does not (a lone surrogate escape such as
   * "\ud800", a number beyond numeric's range such as 1e1000000) fails the whole batch. Each such
   * payload is stored as a JSON string of its text instead, like a body that is not JSON, so that
   * it does not hold up the messages behind it. True when one was found.
   */
  async #quoteRefusedPayloads(rows: InboxRow[]): Promise<boolean> {
    let found = false;
    for (const row of rows) {
      const refusal = await this.#options.sql`SELECT ${row.payloadText}::text::jsonb IS NULL`.then(() => undefined, (error) => error);
      if (refusal === undefined) continue;
      if (!isDataException(refusal)) throw refusal;
      this.#log.warn("an inbound payload is not JSON that PostgreSQL accepts; it is stored as a JSON string of its text", {
        event_id: row.eventId,
        error: toError(refusal).message,
      });
      row.payloadText = withoutNulEscapes(JSON.stringify(row.payloadText));
      found = true;
    }
    return found;
  }

  /** A configured template wins, then the message's own id, then its place in the transport. */
  #eventIdOf(message: InboundMessage, inbox: string, view: OutboxMessage): string {
    if (this.#eventIdTemplate) {
      const rendered = this.#eventIdTemplate(view);
      if (rendered !== "") return boundEventId(rendered);
    }
    return boundEventId(message.eventId ?? `${inbox}:${message.transportId}`);
  }

}

/** One inbox row on its way in: payload and headers as JSON text. */
interface InboxRow {
  eventId: string;
  source: string;
  payloadText: string;
  headers: string;
}

/** SQLSTATE class 22: PostgreSQL refused a value (invalid JSON for jsonb, a number out of range). */
function isDataException(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === "string" && code.startsWith("22");
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

/**
 * withoutNul for JSON text: a `\u0000` escape becomes `\ufffd`. An escaped backslash followed by
 * "u0000" is text, not an escape, and stays.
 */
export function withoutNulEscapes(text: string): string {
  if (!text.includes("\\u0000")) return text;
  return text.replace(/\\(\\|u0000)/g, (escape) => (escape === "\\\\" ? escape : "\\ufffd"));
}
