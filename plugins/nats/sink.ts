// Sink "nats": publishes each outbox message (body = the payload's JSON text as stored) to a subject or a rendered
// subject_template. Where a JetStream stream stores the subject, it publishes through JetStream and
// waits for the PubAck, with Nats-Msg-Id = the dedup key so the stream drops redeliveries; elsewhere
// it publishes on core NATS and flushes (the server got it; core NATS keeps no copy). A publish the
// server refuses for lack of permission fails the message (retriable), on either route.
// A subject_template's values are user data: a value may fill one subject token (no ".", unless
// allow_dots_in names its placeholder; {topic} always may), and no value may lead the subject into
// the server's own "$" APIs ($JS, $SYS, $KV), which the relay's credentials may be allowed to use.

import type { MsgHdrs, NatsConnection } from "@nats-io/transport-node";
import type { JetStreamManager } from "@nats-io/jetstream";
import { z } from "zod";
import type { DeliveryFailure, OutboxMessage, PluginContext, SinkDefinition } from "../../core/plugin.ts";
import {
  checkAuth,
  connectionShape,
  connectNats,
  findStream,
  flushWithin,
  createStream,
  createStreamSchema,
  isPublishSubject,
  openManager,
  PublishDenials,
} from "./connection.ts";
import { HeaderBlock } from "./header_block.ts";
import { JetStreamPublisher, type Outgoing } from "./jetstream_publisher.ts";
import { checkAllowDotsIn, cloudEventHeaderValue, headerText, oneTokenValues, payloadBodyBytes, messageOf, keyOrInstead } from "../shared.ts";

const configSchema = z
  .strictObject({
    ...connectionShape,
    subject: z
      .string()
      .refine((s) => !s.includes("{"), { error: "has a placeholder: use 'subject_template' for per-message subjects", abort: true })
      .refine(isPublishSubject, "must be a NATS subject without wildcards (e.g. \"orders.events\")")
      .optional(),
    /** Per-message subject, e.g. `events.orders.{op}`. */
    subject_template: z.string().min(1).optional(),
    /** Placeholders of subject_template whose values may contain "." (span several tokens), e.g. ["payload.subject"]. */
    allow_dots_in: z.array(z.string().min(1)).default([]),
    /** auto: JetStream where a stream stores the subject, else core; jetstream: a stream is required; core: never JetStream. */
    mode: z.enum(["auto", "jetstream", "core"]).default("auto"),
    /** How long to wait for a PubAck (and for JetStream API calls). */
    timeout_ms: z.number().int().positive().default(5_000),
    /** The stream to create at connect when none stores the subject (its `subjects`, or `subject`). */
    create_stream: createStreamSchema,
  })
  .apply(keyOrInstead, "subject", "subject_template")
  .superRefine((config, issues) => {
    const problem = (path: string, message: string) => issues.addIssue({ code: "custom", path: [path], message });
    if (config.allow_dots_in.length > 0 && !config.subject_template) problem("allow_dots_in", "applies to 'subject_template' only");
    if (config.create_stream && config.mode === "core") problem("create_stream", "applies to JetStream only, not mode \"core\"");
    if (config.create_stream && !config.create_stream.subjects && !config.subject) {
      problem("create_stream", "needs 'subjects' with 'subject_template' (e.g. [\"orders.>\"])");
    }
    checkAuth(config, problem);
  });

export type NatsSinkConfig = z.output<typeof configSchema>;

export const natsSink: SinkDefinition<NatsSinkConfig> = {
  type: "nats",
  kind: "sink",
  growBatches: true,
  summary: "Publishes each message to a NATS subject; JetStream with PubAck and dedup where a stream stores it",
  config: configSchema,
  example: { url: "nats://localhost:4222", subject_template: "events.orders.{op}", mode: "auto" },
  create: createNatsSink,
};

/** How long "no stream stores this subject" is believed before asking again (a stream may be added). */
const NO_STREAM_RECHECK_MS = 60_000;
/** The same in mode "jetstream", where messages wait for that stream: asked again on every retry. */
const MISSING_STREAM_RECHECK_MS = 0;
/** The headers the sink sets on every message. */
const TIDE_HEADERS = new Set(["Tide-Event-Type", "Tide-Outbox", "Tide-Message-Id", "Nats-Msg-Id"]);
/** Subjects whose route is remembered; templates can render many. */
const ROUTE_CACHE_SIZE = 10_000;

type Route = "jetstream" | "core";

interface Planned {
  message: OutboxMessage;
  subject: string;
  route: Route;
}

function createNatsSink(config: NatsSinkConfig, ctx: PluginContext) {
  const where = `nats sink "${ctx.pipeline}"`;
  // Surface an unknown placeholder now, as a config error, rather than on the first message.
  if (config.subject_template) checkAllowDotsIn(config.subject_template, config.allow_dots_in, ctx, `${where}: 'subject_template'`);
  const values = oneTokenValues(config.allow_dots_in, "subject tokens");
  const routes = new Map<string, { route: Route | "missing"; until: number }>();
  let nc: NatsConnection | undefined;
  let publisher: JetStreamPublisher | undefined;
  let jsm: JetStreamManager | undefined;
  let denials: PublishDenials | undefined;
  let closing: Promise<void> | undefined;

  const failure = (message: OutboxMessage, retriable: boolean, text: string, cause?: unknown): DeliveryFailure => ({
    id: message.id,
    error: (retriable ? ctx.errors.transient : ctx.errors.permanent)(`${where}: message ${message.id}: ${text}`, cause),
    retriable,
  });
  // Not tried, or not this message's own failure (order must hold): no retry attempt is spent.
  const heldBack = (message: OutboxMessage, text: string): DeliveryFailure => ({ ...failure(message, true, text), heldBack: true });

  /** Where a subject goes, asked once per subject (JetStream API round trip) and remembered. */
  async function routeOf(subject: string): Promise<Route | "missing"> {
    if (config.mode === "core") return "core";
    const known = routes.get(subject);
    if (known && known.until > Date.now()) return known.route;
    let found;
    try {
      found = await findStream(jsm, subject);
    } catch (error) {
      throw ctx.errors.transient(`${where}: cannot ask JetStream which stream stores "${subject}": ${messageOf(error)}`, error);
    }
    const route = "none" in found ? (config.mode === "jetstream" ? "missing" : "core") : "jetstream";
    if (routes.size >= ROUTE_CACHE_SIZE) routes.delete(routes.keys().next().value as string);
    const recheck = route === "missing" ? MISSING_STREAM_RECHECK_MS : NO_STREAM_RECHECK_MS;
    routes.set(subject, { route, until: route === "jetstream" ? Infinity : Date.now() + recheck });
    return route;
  }

  function headersFor(message: OutboxMessage): MsgHdrs {
    const h = new HeaderBlock();
    let clash = false;
    for (const name of Object.keys(message.headers)) {
      clash ||= TIDE_HEADERS.has(name);
      if (!HeaderBlock.validName(name)) {
        ctx.logger.debug(`${where}: header "${name}" is not a valid NATS header name; not sent`, { id: message.id.toString() });
        continue;
      }
      // A JSON object's names are distinct: append (set would look for the name first).
      h.append(name, headerText(message.headers[name]).replace(/[\r\n]+/g, " "));
    }
    // tide's own headers replace a message header of the same name (set), which is rare: append.
    const put = clash ? h.set.bind(h) : h.append.bind(h);
    put("Tide-Event-Type", message.eventType);
    put("Tide-Outbox", message.outbox);
    put("Tide-Message-Id", message.id.toString());
    // JetStream dedups on it; core subscribers (and the nats source) can use it as the event id.
    put("Nats-Msg-Id", message.dedupKey);
    // CloudEvents NATS binding: a Content-Type of application/cloudevents marks structured mode;
    // binary mode maps every attribute, datacontenttype too, to a ce- header.
    const attributes = message.cloudEventAttributes;
    if (attributes) {
      for (const [name, value] of Object.entries(attributes)) h.set(`ce-${name}`, cloudEventHeaderValue(value));
      if (message.contentType) h.set("ce-datacontenttype", cloudEventHeaderValue(message.contentType));
    } else if (message.contentType) {
      h.set("Content-Type", message.contentType);
    }
    return h.asMsgHdrs();
  }

  function renderSubject(template: string, message: OutboxMessage): string {
    const subject = ctx.render(template, message, values);
    if (subject.startsWith("$") && !template.startsWith("$")) {
      throw new Error(
        `it rendered "${subject}": subjects starting with "$" are the NATS server's own APIs ($JS, $SYS, $KV, ...) ` +
          `and a value may not lead there; to publish to one, start subject_template with it (e.g. "$KV.bucket.{payload.key}")`,
      );
    }
    return subject;
  }

  async function plan(batch: OutboxMessage[], failures: DeliveryFailure[]): Promise<Planned[]> {
    const planned: Planned[] = [];
    let blockedBy: OutboxMessage | undefined;
    for (const message of batch) {
      if (blockedBy) {
        // Order: nothing after a message that waits for a stream goes out before it.
        failures.push(heldBack(message, `held back behind message ${blockedBy.id}, which waits for a stream`));
        continue;
      }
      let subject: string;
      try {
        subject = config.subject ?? renderSubject(config.subject_template!, message);
      } catch (error) {
        failures.push(failure(message, false, `subject_template "${config.subject_template}" refused: ${messageOf(error)}`, error));
        continue;
      }
      if (!isPublishSubject(subject)) {
        failures.push(failure(message, false, `"${subject}" (from "${config.subject_template}") is not a valid NATS subject`));
        continue;
      }
      const route = await routeOf(subject);
      if (route === "missing") {
        // A stream may be created later: keep the message in the outbox and retry, as for a fixed subject.
        failures.push(failure(message, true, `no JetStream stream stores subject "${subject}" (mode "jetstream")`));
        blockedBy = message;
        continue;
      }
      planned.push({ message, subject, route });
    }
    return planned;
  }

  return {
    async connect() {
      if (closing) throw ctx.errors.transient(`${where}: closed`);
      if (nc) return;
      const connection = await connectNats(config, ctx, where);
      try {
        if (config.mode !== "core") {
          jsm = await openManager(connection, config.timeout_ms, config.mode, where, ctx);
          if (config.create_stream) {
            if (!jsm) throw ctx.errors.config(`${where}: 'create_stream' needs JetStream, which is not enabled on the server`);
            const subjects = config.create_stream.subjects ?? [config.subject!];
            if ("none" in (await findStream(jsm, subjects[0]!))) await createStream(jsm, config.create_stream, subjects[0]!, ctx, where);
          }
          if (config.subject && config.mode === "jetstream") {
            const found = await findStream(jsm, config.subject);
            if ("none" in found) throw ctx.errors.config(`${where}: 'subject': ${found.none} (mode "jetstream")`);
          }
        }
      } catch (error) {
        await connection.close().catch(() => {});
        throw error;
      }
      nc = connection;
      denials = new PublishDenials(connection);
      publisher = new JetStreamPublisher(connection);
    },

    async publish(batch: OutboxMessage[]): Promise<DeliveryFailure[]> {
      if (batch.length === 0) return [];
      if (!nc || nc.isClosed()) throw ctx.errors.transient(`${where}: not connected`);
      const failures: DeliveryFailure[] = [];
      const planned = await plan(batch, failures);
      denials!.clear();
      // Everything goes out at once, in order, on one connection; then the acks are collected.
      const outgoing: Outgoing[] = [];
      for (const item of planned) {
        const data = payloadBodyBytes(item.message);
        outgoing.push({ subject: item.subject, data, headers: headersFor(item.message), ack: item.route === "jetstream" });
      }
      const sendErrors = await publisher!.publishAll(outgoing, config.timeout_ms);
      let flushError: unknown;
      let denied = new Map<string, Error>();
      if (planned.some((item, i) => item.route === "core" && sendErrors[i] === undefined)) {
        await flushWithin(nc, config.timeout_ms).catch((error) => (flushError = error));
        if (flushError === undefined) denied = await denials!.take();
      }
      let broken: { id: bigint; error: unknown } | undefined;
      for (const [i, item] of planned.entries()) {
        const error = sendErrors[i] ?? (item.route === "core" ? flushError ?? denied.get(item.subject) : undefined);
        if (broken) {
          // Later messages would land before the failed one on retry: fail them too (the stream drops the repeats).
          failures.push(heldBack(item.message, `not delivered because message ${broken.id} before it failed: ${messageOf(broken.error)}`));
          continue;
        }
        if (error === undefined) continue;
        if (/max.?payload/i.test(messageOf(error))) {
          failures.push(failure(item.message, false, `too large for the NATS server: ${messageOf(error)}`, error));
          continue;
        }
        if (/permissions violation/i.test(messageOf(error))) {
          // Retriable: the message waits in the outbox until the server's permissions allow it.
          const text = `publish to "${item.subject}" was refused: the NATS user has no permission to publish to this subject`;
          failures.push(failure(item.message, true, `${text} (${messageOf(error)})`, error));
          broken = { id: item.message.id, error };
          continue;
        }
        if (item.route === "jetstream") routes.delete(item.subject); // the stream may be gone: ask again
        const what = item.route === "jetstream" ? `JetStream publish to "${item.subject}" got no PubAck` : `publish to "${item.subject}" failed`;
        failures.push(failure(item.message, true, `${what}: ${messageOf(error)}`, error));
        broken = { id: item.message.id, error };
      }
      return failures;
    },

    async close() {
      closing ??= (async () => {
        const current = nc;
        nc = undefined;
        publisher?.close();
        await current?.drain().catch(() => current.close().catch(() => {}));
      })();
      await closing;
    },

    health() {
      return Promise.resolve(!nc || nc.isClosed() ? { ok: false, detail: "not connected" } : { ok: true });
    },
  };
}
