// What the rabbitmq sink and source share: the connection keys of their configs (url, credentials,
// TLS), opening an AMQP 0-9-1 connection from them with errors that name the server and the config
// key the server refused (never a secret), and the broker's answers turned into plain words.

import type { ChannelModel, Options } from "amqplib";
import { z } from "zod";
import type { PluginContext } from "../../core/plugin.ts";
import { cloudEventId, messageOf } from "../shared.ts";

/** Heartbeats every 10 s: a connection cut without a FIN (a dead proxy, a pulled cable) is noticed within ~20 s. */
const HEARTBEAT_S = 10;

/** `amqp://host:5672/vhost` or `amqps://...`; credentials may be in it or in 'username' and 'password'. */
const urlSchema = z.string().check((ctx) => {
  let url: URL;
  try {
    url = new URL(ctx.value);
  } catch {
    ctx.issues.push({ code: "custom", input: ctx.value, message: `"${redactUrl(ctx.value)}" is not a URL (e.g. "amqp://localhost:5672")` });
    return;
  }
  if (url.protocol !== "amqp:" && url.protocol !== "amqps:") {
    ctx.issues.push({ code: "custom", input: ctx.value, message: `must start with amqp:// or amqps:// (got "${url.protocol}//")` });
  } else if (url.hostname === "") {
    ctx.issues.push({ code: "custom", input: ctx.value, message: "names no host" });
  }
});

const tlsSchema = z.strictObject({
  /** PEM text (use `${file:...}` in a manifest to read it from a file). */
  ca: z.string().min(1).optional(),
  cert: z.string().min(1).optional(),
  key: z.string().min(1).optional(),
  reject_unauthorized: z.boolean().default(true),
});

/** Keys that both the sink and the source accept, spread into their strictObject shapes. */
export const connectionShape = {
  url: urlSchema,
  username: z.string().min(1).optional(),
  password: z.string().optional(),
  tls: tlsSchema.optional(),
  /** How long connecting, and each wait for the broker's answer (a publisher confirm), may take. */
  timeout_ms: z.number().int().positive().default(10_000),
};

export interface ConnectionConfig {
  url: string;
  username?: string;
  password?: string;
  tls?: z.output<typeof tlsSchema>;
  timeout_ms: number;
}

/** Credential and TLS keys that exclude each other; call from a schema's superRefine. */
export function checkConnection(config: ConnectionConfig, problem: (path: string, message: string) => void): void {
  let url: URL;
  try {
    url = new URL(config.url);
  } catch {
    return; // reported by the 'url' schema
  }
  if (config.username && url.username) problem("username", "cannot be combined with credentials in 'url'");
  if (config.password !== undefined && !config.username) problem("password", "needs 'username'");
  if (config.tls && url.protocol !== "amqps:") problem("tls", "needs an amqps:// 'url'");
}

/** Opens a connection; its 'error' and 'close' events are the caller's to handle. */
export async function connectAmqp(config: ConnectionConfig, ctx: PluginContext, where: string): Promise<ChannelModel> {
  const url = new URL(config.url);
  const options: Options.Connect = {
    protocol: url.protocol.slice(0, -1),
    hostname: url.hostname.replace(/^\[|\]$/g, ""),
    port: url.port ? Number(url.port) : url.protocol === "amqps:" ? 5671 : 5672,
    username: config.username ?? (url.username ? decodeURIComponent(url.username) : "guest"),
    password: config.username ? config.password ?? "" : url.password ? decodeURIComponent(url.password) : "guest",
    vhost: url.pathname.length > 1 ? decodeURIComponent(url.pathname.slice(1)) : "/",
    heartbeat: HEARTBEAT_S,
  };
  const socket: Record<string, unknown> = {
    timeout: config.timeout_ms,
    clientProperties: { connection_name: `pg-tide ${ctx.pipeline}` },
  };
  if (config.tls) {
    Object.assign(socket, { ca: config.tls.ca, cert: config.tls.cert, key: config.tls.key, rejectUnauthorized: config.tls.reject_unauthorized });
  }
  try {
    const { connect } = await import("amqplib"); // loaded when a RabbitMQ pipeline first connects
    return await connect(options, socket);
  } catch (error) {
    throw ctx.errors.transient(`${where}: cannot connect to RabbitMQ ${serverOf(config)}: ${connectProblem(error, config, options.vhost!)}`, error);
  }
}

/** The server as errors name it: scheme, host, port and virtual host, never credentials. */
export function serverOf(config: ConnectionConfig): string {
  const url = new URL(config.url);
  return `${url.protocol}//${url.host}${url.pathname.length > 1 ? url.pathname : ""}`;
}

export function redactUrl(url: string): string {
  return url.replace(/\/\/[^/@]*@/, "//***@");
}

/** The broker's reply code and text of a channel or connection error, e.g. 404 "NOT_FOUND - no exchange 'x' in vhost '/'". */
export interface BrokerReply {
  code?: number;
  text: string;
}

export function brokerReply(error: unknown): BrokerReply {
  const code = (error as { code?: unknown })?.code;
  const text = messageOf(error);
  const quoted = /with message "(.*)"$/.exec(text);
  return { code: typeof code === "number" ? code : undefined, text: quoted ? quoted[1]! : text };
}

/** Header names that carry a message's own id, after the message-id property. */
const EVENT_ID_HEADERS = ["event_id", "tide-dedup-key", "ce-id", "ce_id", "cloudEvents:id", "cloudEvents_id"];

/**
 * The message's own id: its message-id property, else an id header (a CloudEvents id in binary
 * mode among them), else the id of a structured CloudEvents body.
 */
export function eventIdOf(messageId: unknown, headers: Record<string, unknown>, payload: unknown): string | undefined {
  if (typeof messageId === "string" && messageId !== "") return messageId;
  for (const name of EVENT_ID_HEADERS) {
    const value = headers[name];
    if (typeof value === "string" && value !== "") return value;
  }
  return cloudEventId(payload);
}

/** AMQP header values as tide keeps them: byte strings as text, the rest as they are. */
export function headersOf(table: Record<string, unknown> | undefined): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [name, value] of Object.entries(table ?? {})) out[name] = plain(value);
  return out;
}

function plain(value: unknown): unknown {
  if (Buffer.isBuffer(value)) return value.toString("utf8");
  if (Array.isArray(value)) return value.map(plain);
  if (typeof value === "bigint") return value.toString();
  if (value instanceof Date) return value.toISOString();
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]));
  }
  return value;
}

/** Why connecting failed, in words: which credentials or which virtual host the server refused. */
function connectProblem(error: unknown, config: ConnectionConfig, vhost: string): string {
  const text = messageOf(error);
  if (/ACCESS[-_]REFUSED|403/.test(text)) {
    if (config.username) return `the server refused 'username' "${config.username}" with its 'password' (ACCESS_REFUSED)`;
    if (new URL(config.url).username) return "the server refused the credentials in 'url' (ACCESS_REFUSED)";
    return "the server refused the default guest login (ACCESS_REFUSED): set 'username' and 'password'";
  }
  if (/ConnectionOpenOk|NOT_ALLOWED|530/.test(text)) {
    return `the server refused to open virtual host "${vhost}": it does not exist, or the user may not use it`;
  }
  return redactUrl(text);
}
