// Source "nats": reads a subject (wildcards allowed) into the inbox. Where a JetStream stream stores
// the subject it reads through a durable pull consumer and acks after the inbox commit
// (at-least-once, transportId `nats:seq-<stream sequence>`); elsewhere it subscribes on core NATS,
// optionally in a queue group shared by relays (at-most-once; see readers.ts).

import type { NatsConnection } from "@nats-io/transport-node";
import { z } from "zod";
import type { PluginContext, SourceBatch, SourceDefinition } from "../../core/plugin.ts";
import { checkAuth, connectionShape, connectNats, createStream, createStreamSchema, findStream, isFilterSubject, openManager } from "./connection.ts";
import { messageOf } from "../shared.ts";
import { type NatsReader, openCoreReader, openJetStreamReader } from "./readers.ts";

const DURABLE_NAME = /^[^\s.*>/\\]+$/;
const durableName = z.string().regex(DURABLE_NAME, "must be a name without whitespace, '.', '*', '>', '/' or '\\'");

const configSchema = z
  .strictObject({
    ...connectionShape,
    subject: z.string().refine(isFilterSubject, "must be a NATS subject (wildcards '*' and a final '>' allowed)"),
    /** Core NATS: relays in the same queue group share the messages. JetStream: the default durable name. */
    queue_group: z.string().regex(/^\S+$/, "must not contain whitespace").optional(),
    /** JetStream durable consumer; `consumer_group` is another name for it. Default: queue_group, else `pg-tide-<pipeline>`. */
    durable_name: durableName.optional(),
    consumer_group: durableName.optional(),
    /** The stream to read; default: the one that stores `subject`. */
    stream: z.string().min(1).optional(),
    /** The stream to create when none stores `subject` (instead of failing, or of reading core NATS). */
    create_stream: createStreamSchema,
    /** auto: JetStream where a stream stores the subject, else core; jetstream: a stream is required; core: never JetStream. */
    mode: z.enum(["auto", "jetstream", "core"]).default("auto"),
    /** Where a new durable consumer starts: every stored message, or only those published after it exists. */
    deliver_policy: z.enum(["all", "new"]).default("all"),
    /** How long JetStream waits for an ack before delivering again. */
    ack_wait_ms: z.number().int().min(1_000).default(30_000),
    /** Handled by the engine (inbox event_id template); accepted here so that the key validates. */
    event_id: z.string().optional(),
    /** Handled by the engine (filter); accepted here so that the key validates. */
    transform: z.unknown().optional(),
  })
  .superRefine((config, issues) => {
    const problem = (path: string, message: string) => issues.addIssue({ code: "custom", path: [path], message });
    if (config.durable_name && config.consumer_group && config.durable_name !== config.consumer_group) {
      problem("consumer_group", `must equal 'durable_name' when both are set (got "${config.consumer_group}")`);
    }
    if (config.stream && config.mode === "core") problem("stream", "applies to JetStream only, not mode \"core\"");
    if (config.create_stream && config.mode === "core") problem("create_stream", "applies to JetStream only, not mode \"core\"");
    if (config.create_stream && config.stream) problem("create_stream", "cannot be combined with 'stream' (name the stream in create_stream)");
    checkAuth(config, problem);
  });

export type NatsSourceConfig = z.output<typeof configSchema>;

export const natsSource: SourceDefinition<NatsSourceConfig> = {
  type: "nats",
  kind: "source",
  summary: "Reads a NATS subject: a JetStream durable consumer (acked after the inbox commit) or a core queue group",
  config: configSchema,
  example: { url: "nats://localhost:4222", subject: "payments.confirmed", queue_group: "pg-tide-payments" },
  create: createNatsSource,
};

function createNatsSource(config: NatsSourceConfig, ctx: PluginContext) {
  const where = `nats source "${ctx.pipeline}"`;
  const durable = config.durable_name ?? config.consumer_group ?? safeDurable(config.queue_group ?? `pg-tide-${ctx.pipeline}`);
  let nc: NatsConnection | undefined;
  let reader: NatsReader | undefined;
  let closing: Promise<void> | undefined;

  /** JetStream when a stream stores the subject (or mode says so), else core. */
  async function openReader(connection: NatsConnection): Promise<NatsReader> {
    if (config.mode === "core") return openCoreReader(connection, config.subject, config.queue_group, ctx, where);
    const jsm = await openManager(connection, 10_000, config.mode, where, ctx);
    let stream = config.stream;
    if (!stream && jsm) {
      const found = await findStream(jsm, config.subject).catch((error) => {
        throw ctx.errors.transient(`${where}: cannot ask JetStream which stream stores "${config.subject}": ${messageOf(error)}`, error);
      });
      if ("ambiguous" in found) {
        throw ctx.errors.config(`${where}: 'subject' "${config.subject}" spans streams ${found.ambiguous.join(", ")}; set 'stream'`);
      }
      if ("stream" in found) stream = found.stream;
      else if (config.create_stream) stream = await createStream(jsm, config.create_stream, config.subject, ctx, where);
      else if (config.mode === "jetstream") throw ctx.errors.config(`${where}: 'subject': ${found.none} (mode "jetstream")`);
      else if (config.durable_name || config.consumer_group) {
        // Asked for a durable consumer: reading core NATS instead would lose what is published while
        // the relay is down, so that is an error, not a fallback.
        const named = config.durable_name ? "durable_name" : "consumer_group";
        throw ctx.errors.config(
          `${where}: '${named}' asks for a durable JetStream consumer, but ${found.none}: create a stream that stores it, ` +
            `set 'create_stream': {"name": "..."} to have the relay create one, or leave out '${named}' to read core NATS (at-most-once)`,
        );
      }
    } else if (!jsm && (config.durable_name || config.consumer_group || config.create_stream)) {
      const named = config.create_stream ? "create_stream" : config.durable_name ? "durable_name" : "consumer_group";
      throw ctx.errors.config(`${where}: '${named}' needs JetStream, which is not enabled on the server`);
    }
    if (!stream || !jsm) {
      ctx.logger.info(`${where}: no JetStream stream stores "${config.subject}"; subscribing on core NATS (at-most-once)`);
      return openCoreReader(connection, config.subject, config.queue_group, ctx, where);
    }
    const options = { stream, durable, subject: config.subject, deliverPolicy: config.deliver_policy, ackWaitMs: config.ack_wait_ms };
    return await openJetStreamReader(connection, jsm, options, ctx, where);
  }

  return {
    async connect() {
      if (closing) throw ctx.errors.transient(`${where}: closed`);
      if (reader) return;
      const connection = await connectNats(config, ctx, where);
      try {
        reader = await openReader(connection);
        // The server knows the subscription once it answered a PING: connect() resolving means
        // messages published from now on reach this source (and its queue group share).
        await connection.flush();
      } catch (error) {
        await connection.close().catch(() => {});
        throw error;
      }
      nc = connection;
    },

    async read(): Promise<SourceBatch | null> {
      if (ctx.signal.aborted || closing) return null;
      if (!reader) throw ctx.errors.transient(`${where}: not connected`);
      return await reader.read();
    },

    async close() {
      closing ??= (async () => {
        await reader?.close();
        const current = nc;
        nc = undefined;
        await current?.drain().catch(() => current.close().catch(() => {}));
      })();
      await closing;
    },

    health() {
      return Promise.resolve(!nc || nc.isClosed() ? { ok: false, detail: "not connected" } : { ok: true });
    },
  };
}

/** A queue group or pipeline name as a durable consumer name: characters JetStream refuses become '_'. */
function safeDurable(name: string): string {
  return name.replace(/[\s.*>/\\]/g, "_");
}
