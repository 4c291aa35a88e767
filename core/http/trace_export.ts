// Spans for delivered batches, sent to an OpenTelemetry collector as OTLP/HTTP JSON
// (`<endpoint>/v1/traces`, --otlp-endpoint): one span per batch a forward pipeline delivered, with a
// link to the trace context (`traceparent` header) of each message in it.
//
// Off the delivery path: delivered() only puts a span in a bounded queue (a full queue drops new
// spans, counted and logged); a timer sends the queue in batches; a failed export drops its spans
// and is logged once until an export succeeds again. Delivery never waits for the collector.
//
// Written by hand rather than with the OpenTelemetry SDK: the SDK's tracer, batch processor and
// OTLP exporter are a dozen packages for what is here one JSON document and one fetch per second,
// and the relay needs no tracer API (it creates exactly one kind of span, after the fact).

import { randomBytes } from "node:crypto";
import type { RelayEvents } from "../engine/events.ts";
import type { Logger } from "../log.ts";
import type { OutboxMessage } from "../plugin.ts";
import { VERSION } from "../version.ts";

/** W3C trace context, parsed from a `traceparent` header (and `tracestate` beside it). */
export interface TraceContext {
  traceId: string;
  spanId: string;
  traceState?: string;
}

export interface SpanExporterOptions {
  /** The collector's base URL; spans go to `<endpoint>/v1/traces`. */
  endpoint: string;
  logger: Logger;
  relayId: string;
  relayGroupId: string;
}

/** Spans waiting to be sent; beyond this, new ones are dropped. */
export const MAX_QUEUED_SPANS = 2_048;
/** Spans per export request. */
export const EXPORT_BATCH_SPANS = 512;
export const EXPORT_INTERVAL_MS = 1_000;
export const EXPORT_TIMEOUT_MS = 10_000;
/** OpenTelemetry's default span link limit. */
export const MAX_LINKS_PER_SPAN = 128;

const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$/;

/**
 * The trace context in a message's headers, or undefined when its `traceparent` is missing or is
 * not one (version ff, an all-zero id): a malformed header is ignored, never an error.
 */
export function parseTraceContext(headers: Record<string, unknown>): TraceContext | undefined {
  const { traceparent, tracestate } = headers;
  if (typeof traceparent !== "string") return undefined;
  const match = TRACEPARENT.exec(traceparent.trim());
  if (!match) return undefined;
  const [, version, traceId, spanId, , rest] = match;
  if (version === "ff" || (version === "00" && rest !== undefined)) return undefined;
  if (/^0+$/.test(traceId!) || /^0+$/.test(spanId!)) return undefined;
  return typeof tracestate === "string" && tracestate !== "" ? { traceId: traceId!, spanId: spanId!, traceState: tracestate } : { traceId: traceId!, spanId: spanId! };
}

export class SpanExporter {
  readonly events: RelayEvents;
  readonly #options: SpanExporterOptions;
  readonly #url: string;
  readonly #resource: object;
  #queue: object[] = [];
  #timer: ReturnType<typeof setInterval> | undefined;
  #sending: Promise<void> | undefined;
  /** Set after a failed export: the next failures are not logged again until one succeeds. */
  #failing = false;
  #dropped = 0;

  constructor(options: SpanExporterOptions) {
    this.#options = options;
    this.#url = `${options.endpoint.replace(/\/+$/, "")}/v1/traces`;
    this.#resource = {
      attributes: [
        attribute("service.name", "pg-tide"),
        attribute("service.version", VERSION),
        attribute("service.instance.id", options.relayId),
        attribute("tide.relay_group_id", options.relayGroupId),
      ],
    };
    this.events = { delivered: (pipeline, messages, startedAt) => this.#record(pipeline, messages, startedAt ?? Date.now()) };
  }

  start(): void {
    this.#timer ??= setInterval(() => void this.flush(), EXPORT_INTERVAL_MS);
  }

  /** Sends what is queued (one request at a time); resolves when that request is done. */
  flush(): Promise<void> {
    if (this.#sending) return this.#sending;
    if (this.#queue.length === 0) return Promise.resolve();
    const spans = this.#queue.splice(0, EXPORT_BATCH_SPANS);
    this.#sending = this.#send(spans).finally(() => (this.#sending = undefined));
    return this.#sending;
  }

  /** Stops the timer and sends what is left, giving up after EXPORT_TIMEOUT_MS. */
  async stop(): Promise<void> {
    clearInterval(this.#timer);
    this.#timer = undefined;
    const deadline = Date.now() + EXPORT_TIMEOUT_MS;
    while ((this.#queue.length > 0 || this.#sending) && Date.now() < deadline) await this.flush();
  }

  #record(pipeline: string, messages: OutboxMessage[], startedAt: number): void {
    if (messages.length === 0) return;
    if (this.#queue.length >= MAX_QUEUED_SPANS) {
      if (this.#dropped++ === 0) {
        this.#options.logger.warn("trace export: the span queue is full; spans are dropped until the collector catches up", {
          endpoint: this.#options.endpoint,
        });
      }
      return;
    }
    const links: object[] = [];
    let droppedLinks = 0;
    for (const message of messages) {
      const context = parseTraceContext(message.headers);
      if (!context) continue;
      if (links.length >= MAX_LINKS_PER_SPAN) {
        droppedLinks++;
        continue;
      }
      links.push({
        traceId: context.traceId,
        spanId: context.spanId,
        ...(context.traceState ? { traceState: context.traceState } : {}),
        attributes: [attribute("tide.dedup_key", message.dedupKey)],
      });
    }
    this.#queue.push({
      traceId: randomBytes(16).toString("hex"),
      spanId: randomBytes(8).toString("hex"),
      name: `send ${pipeline}`,
      kind: SPAN_KIND_PRODUCER,
      startTimeUnixNano: nanos(startedAt),
      endTimeUnixNano: nanos(Date.now()),
      attributes: [
        attribute("tide.pipeline", pipeline),
        attribute("tide.outbox", messages[0]!.outbox),
        attribute("messaging.operation.type", "send"),
        { key: "messaging.batch.message_count", value: { intValue: String(messages.length) } },
        attribute("tide.first_message_id", messages[0]!.id.toString()),
        attribute("tide.last_message_id", messages[messages.length - 1]!.id.toString()),
      ],
      links,
      ...(droppedLinks > 0 ? { droppedLinksCount: droppedLinks } : {}),
      status: { code: STATUS_OK },
    });
    if (this.#queue.length >= EXPORT_BATCH_SPANS) void this.flush();
  }

  async #send(spans: object[]): Promise<void> {
    const body = JSON.stringify({ resourceSpans: [{ resource: this.#resource, scopeSpans: [{ scope: { name: "pg-tide", version: VERSION }, spans }] }] });
    try {
      const response = await fetch(this.#url, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body,
        signal: AbortSignal.timeout(EXPORT_TIMEOUT_MS),
      });
      await response.body?.cancel().catch(() => {});
      if (!response.ok) throw new Error(`the collector answered ${response.status}`);
      if (this.#failing) this.#options.logger.info("trace export: spans are being exported again", { endpoint: this.#url });
      this.#failing = false;
      this.#dropped = 0;
    } catch (error) {
      if (!this.#failing) {
        this.#options.logger.warn("trace export failed; its spans are dropped (logged once until an export succeeds)", {
          endpoint: this.#url,
          spans: spans.length,
          error: error instanceof Error ? error.message : String(error),
        });
      }
      this.#failing = true;
    }
  }
}

const SPAN_KIND_PRODUCER = 4;
const STATUS_OK = 1;

function attribute(key: string, value: string) {
  return { key, value: { stringValue: value } };
}

function nanos(ms: number): string {
  return `${BigInt(Math.round(ms)) * 1_000_000n}`;
}
