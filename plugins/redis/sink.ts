// Sink "redis": appends each outbox message to a Redis stream (XADD) named by `stream` or a rendered
// stream_template, optionally capped with MAXLEN ~. One pipeline per batch, so a batch is one round
// trip. Retries are idempotent: each XADD runs in a script that first looks for the message's dedup
// marker (`<stream>:tide-dedup:<dedup key>`, kept for dedup_window_s), adds the entry only when
// there is none, and sets the marker in the same atomic step; a batch resent after a lost reply adds
// nothing twice. A stream_template's values are user data: a value fills one ":"-separated part of
// the key unless allow_colons_in names its placeholder ({topic} always may).

import type { ChainableCommander, Redis } from "ioredis";
import { z } from "zod";
import type { DeliveryFailure, OutboxMessage, PluginContext, SinkDefinition } from "../../core/plugin.ts";
import { checkConnection, connectionShape, connectRedis, describeRedisError, isConnectionError, serverOf } from "./connection.ts";
import { checkAllowedIn, headerText, messageOf, oneSegmentValues, payloadBody, toJson, keyOrInstead } from "../shared.ts";

const configSchema = z
  .strictObject({
    ...connectionShape,
    stream: z
      .string()
      .min(1)
      .refine((s) => !s.includes("{"), { error: "has a placeholder: use 'stream_template' for per-message streams" })
      .optional(),
    /** Per-message stream key, e.g. `events:{outbox}`. */
    stream_template: z.string().min(1).optional(),
    /** Placeholders of stream_template whose values may contain ":" (span several key parts). */
    allow_colons_in: z.array(z.string().min(1)).default([]),
    /** Trims the stream to about this many entries on every add (`XADD ... MAXLEN ~ n`). */
    maxlen: z.number().int().positive().optional(),
    /** How long a message's dedup marker is kept: a retry within it adds nothing. 0: no markers, plain XADD. */
    dedup_window_s: z.number().int().min(0).default(86_400),
  })
  .apply(keyOrInstead, "stream", "stream_template")
  .superRefine((config, issues) => {
    const problem = (path: string, message: string) => issues.addIssue({ code: "custom", path: [path], message });
    if (config.allow_colons_in.length > 0 && !config.stream_template) problem("allow_colons_in", "applies to 'stream_template' only");
    checkConnection(config, problem);
  });

export type RedisSinkConfig = z.output<typeof configSchema>;

export const redisSink: SinkDefinition<RedisSinkConfig> = {
  type: "redis",
  kind: "sink",
  growBatches: true,
  summary: "Appends each message to a Redis stream (XADD, MAXLEN ~), idempotent across retries by dedup key",
  config: configSchema,
  example: { url: "redis://localhost:6379", stream_template: "events:{outbox}", maxlen: 1_000_000 },
  create: createRedisSink,
};

/**
 * KEYS[1]: the stream; KEYS[2]: the message's dedup marker. ARGV[1]: the marker's lifetime in
 * seconds; ARGV[2]: MAXLEN ("0": none); ARGV[3...]: the entry's fields and values. Returns the
 * entry id, the one added before when the marker is there.
 */
const ADD_ONCE = `
local seen = redis.call('GET', KEYS[2])
if seen then return seen end
local id
if ARGV[2] == '0' then
  id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
else
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
end
redis.call('SET', KEYS[2], id, 'EX', ARGV[1])
return id
`;

interface Planned {
  message: OutboxMessage;
  stream: string;
}

type AddOnce = (stream: string, marker: string, ttl: number, maxlen: number, ...fields: string[]) => ChainableCommander;

function createRedisSink(config: RedisSinkConfig, ctx: PluginContext) {
  const where = `redis sink "${ctx.pipeline}"`;
  const server = serverOf(config);
  // Surface an unknown placeholder now, as a config error, rather than on the first message.
  if (config.stream_template) checkAllowedIn(config.stream_template, config.allow_colons_in, "allow_colons_in", ctx, `${where}: 'stream_template'`);
  const values = oneSegmentValues(":", "allow_colons_in", config.allow_colons_in, "key parts");
  let client: Redis | undefined;
  let closing: Promise<void> | undefined;

  const failure = (message: OutboxMessage, retriable: boolean, text: string, cause?: unknown): DeliveryFailure => ({
    id: message.id,
    error: (retriable ? ctx.errors.transient : ctx.errors.permanent)(`${where}: message ${message.id}: ${text}`, cause),
    retriable,
  });
  const heldBack = (message: OutboxMessage, text: string): DeliveryFailure => ({ ...failure(message, true, text), heldBack: true });

  function fieldsOf(message: OutboxMessage): string[] {
    const headers: Record<string, string> = {};
    for (const [name, value] of Object.entries(message.headers)) headers[name] = headerText(value);
    return [
      "payload", payloadBody(message),
      "headers", toJson(headers),
      "tide-dedup-key", message.dedupKey,
      "tide-event-type", message.eventType,
      "tide-outbox", message.outbox,
      "tide-message-id", message.id.toString(),
    ];
  }

  function add(pipeline: ChainableCommander, { message, stream }: Planned): void {
    const fields = fieldsOf(message);
    if (config.dedup_window_s === 0) {
      const cap = config.maxlen ? ["MAXLEN", "~", String(config.maxlen)] : [];
      pipeline.call("XADD", stream, ...cap, "*", ...fields);
      return;
    }
    const marker = `${stream}:tide-dedup:${message.dedupKey}`;
    (pipeline as unknown as { tideAddOnce: AddOnce }).tideAddOnce(stream, marker, config.dedup_window_s, config.maxlen ?? 0, ...fields);
  }

  return {
    async connect() {
      if (closing) throw ctx.errors.transient(`${where}: closed`);
      if (client) return;
      const connection = await connectRedis(config, ctx, where);
      connection.defineCommand("tideAddOnce", { numberOfKeys: 2, lua: ADD_ONCE });
      client = connection;
    },

    async publish(batch: OutboxMessage[]): Promise<DeliveryFailure[]> {
      if (batch.length === 0) return [];
      if (!client) throw ctx.errors.transient(`${where}: not connected`);
      const failures: DeliveryFailure[] = [];
      const planned: Planned[] = [];
      for (const message of batch) {
        try {
          const stream = config.stream ?? ctx.render(config.stream_template!, message, values);
          if (stream === "") throw new Error("it rendered an empty key");
          planned.push({ message, stream });
        } catch (error) {
          failures.push(failure(message, false, `stream_template "${config.stream_template}" refused: ${messageOf(error)}`, error));
        }
      }
      if (planned.length === 0) return failures;
      const pipeline = client.pipeline();
      for (const item of planned) add(pipeline, item);
      let results: [Error | null, unknown][] | null;
      try {
        results = await pipeline.exec();
      } catch (error) {
        throw ctx.errors.transient(`${where}: adding to ${server} failed: ${describeRedisError(error, server, client)}`, error);
      }
      const lost = results?.find(([error]) => error && isConnectionError(error))?.[0];
      if (!results || lost) {
        // The connection went away: which adds arrived is unknown; the markers make a resend safe.
        throw ctx.errors.transient(`${where}: adding to ${server} failed: ${describeRedisError(lost, server, client)}`, lost);
      }
      let broken: { id: bigint; text: string } | undefined;
      for (const [index, item] of planned.entries()) {
        const error = results[index]![0];
        if (broken) {
          failures.push(heldBack(item.message, `not delivered because message ${broken.id} before it failed: ${broken.text}`));
          continue;
        }
        if (!error) continue;
        const text = messageOf(error).replace(/ script: \w+, on @user_script:\d+\.?/, "");
        if (/^WRONGTYPE/.test(text)) {
          failures.push(failure(item.message, false, `key "${item.stream}" holds something other than a stream (${text})`, error));
          continue;
        }
        if (/^NOPERM/.test(text)) {
          const denied = `the Redis user may not add to "${item.stream}" (${text}); it waits in the outbox until an ACL allows it`;
          failures.push({ ...failure(item.message, true, denied, error), refused: true });
        } else {
          failures.push(failure(item.message, true, `adding to "${item.stream}" failed: ${text}`, error));
        }
        broken = { id: item.message.id, text };
      }
      return failures;
    },

    async close() {
      closing ??= (async () => {
        const current = client;
        client = undefined;
        await current?.quit().catch(() => current.disconnect());
      })();
      await closing;
    },

    health() {
      if (!client) return Promise.resolve({ ok: false, detail: "not connected" });
      return Promise.resolve(client.status === "ready" ? { ok: true } : { ok: false, detail: `connection ${client.status}` });
    },
  };
}
