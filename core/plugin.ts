// The plugin contract: what every sink and source, built-in or drop-in, looks like to the engine.
// A drop-in plugin file default-exports a PluginDefinition and imports nothing from tide itself:
// everything it needs at run time (logger, error constructors, abort signal) arrives through ctx.

import type { StandardSchemaV1 } from "@standard-schema/spec";

export type PluginKind = "sink" | "source";

/** One outbox message as a sink receives it. */
export interface OutboxMessage {
  /** Outbox row id: increasing, unique per database. */
  id: bigint;
  outbox: string;
  topic: string | null;
  /**
   * The payload's JSON text exactly as PostgreSQL produced it (jsonb output: keys sorted, `": "`
   * and `", "` between them). This is what a sink sends: the relay never parses and re-serializes
   * it, so no number or escape changes on the way.
   */
  payloadText: string;
  /**
   * The same payload as the UTF-8 bytes PostgreSQL sent (payloadText is their decoding, made on
   * first use), when the relay read it as bytes: a sink whose client takes bytes sends these as
   * they are and spares decoding and encoding the text. Absent when there are no such bytes (a wire
   * format made the body, a source's message): payloadText is then the body. Never modify them.
   */
  payloadBytes?: Uint8Array;
  /**
   * The payload parsed on first use, losslessly: integers beyond 2^53 are BigInt, and a number that
   * a JavaScript number would change (`1.50`, a long decimal) is an object whose String() and
   * JSON.stringify give its exact text. For reading fields; send payloadText.
   */
  readonly payload: unknown;
  /**
   * Parsed like payload: header values may be BigInt or exact-number objects as well. Read-only
   * (frozen): messages of a batch whose headers are the same text share one object.
   */
  headers: Record<string, unknown>;
  /** Stable across redeliveries: `<outbox>:<id>`. Sinks pass it on as the broker's dedup key. */
  dedupKey: string;
  /** `headers.event_type`, else `payload.event_type`, else "event". */
  eventType: string;
  /** `headers.op`, else `payload.op`, else "publish" (table capture sets insert/update/delete). */
  op: string;
  createdAt: Date;
  /**
   * The body's media type, when a wire format sets one: `application/cloudevents+json;
   * charset=utf-8` for a structured CloudEvent, the event's datacontenttype in binary mode. A sink
   * that has a content-type field sends it there; without it the body is JSON (`application/json`).
   */
  contentType?: string;
  /**
   * Set in CloudEvents binary mode (`wire_format = "cloudevents-binary"`): the event's context
   * attributes but datacontenttype (specversion, id, source, type, subject, time), which a sink
   * writes into its transport's headers as its CloudEvents protocol binding says. The body is the
   * event's data: the payload text, unchanged.
   */
  cloudEventAttributes?: Record<string, string>;
}

/** One message handed to the inbox by a source. */
export interface InboundMessage {
  /**
   * The message's own id, when it carries one (`Nats-Msg-Id`, a Kafka `event_id`/`id` header,
   * a CloudEvents `id`). The engine uses it as the inbox event_id unless the pipeline configures
   * an `event_id` template.
   */
  eventId?: string;
  /**
   * Where the message sits in the transport, stable across redeliveries: `nats:seq-<stream seq>`,
   * `kafka:<partition>-<offset>`. Without an eventId, the inbox event_id is `<inbox>:<transportId>`.
   */
  transportId: string;
  /**
   * The body as JSON text, as the broker delivered it: the engine writes it into the inbox with a
   * cast to jsonb and never parses and re-serializes it. A body that is not JSON is handed over as a
   * JSON string of its text, a missing body as `null`. Filters and event_id templates see it parsed
   * losslessly.
   */
  payloadText?: string;
  /** The payload as a value, for a source that has no text of it; ignored when payloadText is set. */
  payload?: unknown;
  headers: Record<string, unknown>;
  /** Where it came from, e.g. `nats:payments.confirmed`. */
  source: string;
}

/** A sink reports only the messages that failed; everything else in the batch was acknowledged. */
export interface DeliveryFailure {
  id: bigint;
  error: Error;
  /** false: retrying cannot help (bad payload, 4xx); the message goes to the DLQ at once. */
  retriable: boolean;
  /**
   * true: the sink did not try this message at all (an earlier one failed and order must hold).
   * It is retried, and the attempt does not count against the message's retry budget.
   */
  heldBack?: boolean;
  /**
   * true: the target answered and refused this very message (e.g. an HTTP 4xx retried under
   * retry_client_errors). Such a failure spends the message's attempts even when nothing else in the
   * batch went through; without it, a batch whose every tried message failed retriably is taken for
   * an outage and retried without spending anyone's attempts.
   */
  refused?: boolean;
}

export interface SinkInstance {
  connect(): Promise<void>;
  /**
   * Resolves once the target acknowledged, with the messages that failed. A rejection means the
   * whole batch failed and is always retried (the target is down); a message that retrying cannot
   * fix must be reported as a failure with retriable: false, so it reaches the dead-letter queue.
   */
  publish(batch: OutboxMessage[]): Promise<DeliveryFailure[]>;
  close(): Promise<void>;
  health?(): Promise<{ ok: boolean; detail?: string }>;
}

export interface SourceBatch {
  messages: InboundMessage[];
  /** Called only after the inbox rows are committed. */
  ack(): Promise<void>;
  /** Called when writing the batch failed; the source should arrange redelivery. */
  nack?(error: Error): Promise<void>;
}

export interface SourceInstance {
  connect(): Promise<void>;
  /** Waits for the next batch (up to ctx.batchSize messages); resolves null when ctx.signal aborts. */
  read(): Promise<SourceBatch | null>;
  close(): Promise<void>;
  health?(): Promise<{ ok: boolean; detail?: string }>;
}

/** Registers a handler for requests to `/ingest/<path>`; returns a function that removes it. */
export interface HttpRoutes {
  route(path: string, handler: (request: Request) => Promise<Response>, options?: RouteOptions): () => void;
}

export interface RouteOptions {
  /**
   * true: the handler authenticates every request itself (it verifies a signature), so the relay
   * does not ask for its --http-token here: a third party that signs its webhooks cannot add our
   * token. false (the default): with --http-token set, a request without the token gets 401 before
   * the handler sees it.
   */
  authenticates?: boolean;
}

export interface PluginLogger {
  debug(message: string, fields?: Record<string, unknown>): void;
  info(message: string, fields?: Record<string, unknown>): void;
  warn(message: string, fields?: Record<string, unknown>): void;
  error(message: string, fields?: Record<string, unknown>): void;
}

/** Error constructors handed to plugins so that they throw tide's typed errors without importing tide. */
export interface PluginErrors {
  /** A failure that may succeed on retry (network, 5xx, timeout). */
  transient(message: string, cause?: unknown): Error;
  /** A failure that retrying cannot fix (4xx, invalid payload). */
  permanent(message: string, cause?: unknown): Error;
  /** Invalid configuration. */
  config(message: string): Error;
}

export interface PluginContext {
  /** Pipeline name: use it in log lines and error messages. */
  pipeline: string;
  logger: PluginLogger;
  errors: PluginErrors;
  /** Aborted when the pipeline stops; long waits must honour it. */
  signal: AbortSignal;
  batchSize: number;
  /** The relay's own database, for plugins that write back into it (the inbox sink). */
  postgresUrl?: string;
  /**
   * Routes on the relay's HTTP server (--metrics-addr), for sources that receive requests (the
   * webhook source). Absent when the relay serves no HTTP.
   */
  http?: HttpRoutes;
  /** Renders `{outbox}`, `{topic}`, `{op}`, `{event_type}`, `{id}`, `{payload.a.b}`, `{headers.x}`. */
  render(template: string, message: OutboxMessage, options?: RenderOptions): string;
  /**
   * The relay group running a forward pipeline (relays of different groups each deliver every
   * message): part of a name that must be unique per delivering relay, such as a Kafka
   * transactional id. Absent outside a running relay (`pg-tide check`).
   */
  relayGroupId?: string;
  /**
   * tide's fault injection (TIDE_FAILPOINTS) for built-in plugins' own points, such as
   * `kafka.before-commit`; does nothing unless the variable names the point. Absent outside a relay.
   */
  failpoint?(name: string): Promise<void>;
}

export interface RenderOptions {
  /**
   * Called with each substituted value (never the template's own text) and its placeholder's name
   * as written, e.g. `payload.region`; returns the text to insert (escaped, for example) or throws
   * to refuse the message.
   */
  value?(value: string, placeholder: string): string;
}

interface DefinitionBase<Config> {
  type: string;
  summary: string;
  /** Any Standard Schema validator (zod v4, valibot, arktype, ...). Unknown keys should be rejected. */
  config: StandardSchemaV1<unknown, Config>;
  /** A config that validates: shown by `pg-tide plugins`, checked by the contract tests. */
  example: Record<string, unknown>;
  /** The plugin's own version, logged when the relay loads it. */
  version?: string;
}

/**
 * What pg-tide hands a drop-in plugin whose default export is a function (`export default ({ z }) =>
 * ({ ... })`): a file next to the compiled binary has no node_modules to import zod from, so it takes
 * the zod the binary carries.
 */
export interface PluginKit {
  z: typeof import("zod").z;
  errors: PluginErrors;
  /** pg-tide's version. */
  tideVersion: string;
}

export interface SinkDefinition<Config = any> extends DefinitionBase<Config> {
  kind: "sink";
  /**
   * True when publish() takes batches of any size equally well (a broker client that splits them
   * as it must): while a backlog lasts, the engine then reads batches of up to `max_batch_size`
   * messages (default 1000) rather than `batch_size`. Leave it unset when a batch is something the
   * target sees (one webhook request per batch).
   */
  growBatches?: boolean;
  /** Pure: builds the instance, no I/O until connect(). */
  create(config: Config, ctx: PluginContext): SinkInstance;
}

export interface SourceDefinition<Config = any> extends DefinitionBase<Config> {
  kind: "source";
  create(config: Config, ctx: PluginContext): SourceInstance;
}

export type PluginDefinition<Config = any> = SinkDefinition<Config> | SourceDefinition<Config>;
