// What the nats sink and source share: the connection keys of their configs (servers, token,
// user/password, creds file, TLS), opening a connection from them with errors that name the servers
// (credentials hidden), the JetStream stream lookup by subject, publish permission errors, and the
// header/payload/event id conversions.

import { readFile } from "node:fs/promises";
import {
  connect,
  credsAuthenticator,
  Match,
  type MsgHdrs,
  type NatsConnection,
  type NodeConnectionOptions,
  PermissionViolationError,
} from "@nats-io/transport-node";
import { type JetStreamManager, jetstreamManager, StorageType } from "@nats-io/jetstream";
import { z } from "zod";
import type { PluginContext } from "../../core/plugin.ts";
import { cloudEventId, messageOf } from "../shared.ts";

/** `nats://host:4222`, `"a:4222,b:4222"` or a list; normalized to a list. */
const serversSchema = z
  .union([z.string(), z.array(z.string())], { error: "must be a NATS URL or a list of them" })
  .transform((value) => (Array.isArray(value) ? value : value.split(",")).map((s) => s.trim()).filter((s) => s !== ""))
  .check((ctx) => {
    if (ctx.value.length === 0) ctx.issues.push({ code: "custom", input: ctx.value, message: "must name at least one server" });
    for (const server of ctx.value) {
      if (!/^((nats|tls):\/\/)?[^\s/]+$/.test(server.replace(/\/$/, ""))) {
        ctx.issues.push({ code: "custom", input: ctx.value, message: `"${redactUrl(server)}" is not a NATS server URL` });
      }
    }
  });

const tlsSchema = z.union([
  z.boolean(),
  z.strictObject({
    ca_file: z.string().min(1).optional(),
    cert_file: z.string().min(1).optional(),
    key_file: z.string().min(1).optional(),
    /** PEM text instead of files. */
    ca: z.string().min(1).optional(),
    cert: z.string().min(1).optional(),
    key: z.string().min(1).optional(),
    handshake_first: z.boolean().optional(),
    reject_unauthorized: z.boolean().optional(),
  }),
]);

/** Keys that both the sink and the source accept, spread into their strictObject shapes. */
export const connectionShape = {
  url: serversSchema,
  token: z.string().min(1).optional(),
  user: z.string().min(1).optional(),
  password: z.string().optional(),
  /** A `.creds` file (JWT + NKey seed) from `nsc` or NGS. */
  creds_file: z.string().min(1).optional(),
  tls: tlsSchema.optional(),
};

export interface ConnectionConfig {
  url: string[];
  token?: string;
  user?: string;
  password?: string;
  creds_file?: string;
  tls?: z.output<typeof tlsSchema>;
}

/** Auth keys that exclude each other; call from a schema's superRefine. */
export function checkAuth(config: ConnectionConfig, problem: (path: string, message: string) => void): void {
  const kinds = [config.token && "token", config.user && "user", config.creds_file && "creds_file"].filter(Boolean);
  if (kinds.length > 1) problem(kinds[1] as string, `cannot be combined with '${kinds[0]}'`);
  if (config.password !== undefined && !config.user) problem("password", "needs 'user'");
}

/** Opens a connection; reconnects forever once connected, but the first attempt fails fast. */
export async function connectNats(config: ConnectionConfig, ctx: PluginContext, where: string): Promise<NatsConnection> {
  const options: NodeConnectionOptions & { pendingLimit?: number } = {
    servers: config.url,
    name: `pg-tide ${ctx.pipeline}`,
    timeout: 5_000,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 1_000,
    // The client writes to its socket whenever 32 KiB are waiting (its default, an option it does not
    // declare); a sink hands over a whole batch at once: let it go out in one write at the end of the tick.
    pendingLimit: 4 * 1024 * 1024,
    token: config.token,
    user: config.user,
    pass: config.password,
  };
  if (config.creds_file) {
    let creds: Uint8Array;
    try {
      creds = await readFile(config.creds_file);
    } catch (error) {
      throw ctx.errors.config(`${where}: 'creds_file': cannot read ${config.creds_file}: ${messageOf(error)}`);
    }
    options.authenticator = credsAuthenticator(creds);
  }
  if (config.tls === true) options.tls = {};
  else if (config.tls) {
    const t = config.tls;
    options.tls = {
      caFile: t.ca_file, certFile: t.cert_file, keyFile: t.key_file, ca: t.ca, cert: t.cert, key: t.key,
      handshakeFirst: t.handshake_first, rejectUnauthorized: t.reject_unauthorized,
    };
  }
  let nc: NatsConnection;
  try {
    nc = await connect(options);
  } catch (error) {
    const refused = /authorization violation|authentication/i.test(messageOf(error)) ? `; ${authProblem(config)}` : "";
    throw ctx.errors.transient(
      `${where}: cannot connect to NATS ${config.url.map(redactUrl).join(",")}: ${messageOf(error)}${refused}`,
      error,
    );
  }
  watchStatus(nc, ctx, where);
  return nc;
}

/**
 * The subjects the server refused publishes to. A core publish has no reply: a PUB the user may
 * not send is dropped by the server, which says so only in an asynchronous -ERR ("Permissions
 * Violation for Publish to ...") that the client turns into a status event.
 */
export class PublishDenials {
  readonly #denied = new Map<string, PermissionViolationError>();

  constructor(nc: NatsConnection) {
    void this.#watch(nc);
  }

  /** Forgets the denials seen so far (those of earlier batches). */
  clear(): void {
    this.#denied.clear();
  }

  /**
   * The denials since clear(), by subject. Call it after a flush: the server answers PUBs in
   * order, so the -ERR of every PUB sent before the flush arrived before its PONG. The status
   * iterator hands events over in later microtasks; one macrotask turn lets it catch up.
   */
  async take(): Promise<Map<string, PermissionViolationError>> {
    await new Promise((resolve) => setTimeout(resolve, 0));
    const denied = new Map(this.#denied);
    this.#denied.clear();
    return denied;
  }

  async #watch(nc: NatsConnection): Promise<void> {
    try {
      for await (const status of nc.status()) {
        if (status.type !== "error" || !(status.error instanceof PermissionViolationError)) continue;
        if (status.error.operation === "publish") this.#denied.set(status.error.subject, status.error);
      }
    } catch {
      // The iterator ends with the connection.
    }
  }
}

/** The JetStream manager, or undefined when the server has no JetStream and the mode allows core. */
export async function openManager(
  nc: NatsConnection,
  timeout: number,
  mode: "auto" | "jetstream",
  where: string,
  ctx: PluginContext,
): Promise<JetStreamManager | undefined> {
  try {
    return await jetstreamManager(nc, { timeout });
  } catch (error) {
    const disabled = /not enabled|no responders|503/i.test(`${(error as Error)?.name} ${messageOf(error)}`);
    if (!disabled) throw ctx.errors.transient(`${where}: JetStream API unavailable: ${messageOf(error)}`, error);
    if (mode === "jetstream") throw ctx.errors.config(`${where}: 'mode' is "jetstream" but JetStream is not enabled on the server`);
    ctx.logger.info(`${where}: JetStream is not enabled on the server; using core NATS`);
    return undefined;
  }
}

export type StreamLookup = { stream: string } | { none: string } | { ambiguous: string[] };

/**
 * `create_stream`: the stream the pipeline creates when none stores its subject (instead of failing,
 * or of a source falling back to core NATS). Never changes an existing stream.
 */
export const createStreamSchema = z
  .strictObject({
    name: z.string().regex(/^[^\s.*>/\\]+$/, "must be a stream name without whitespace, '.', '*', '>', '/' or '\\'"),
    /** Default: the pipeline's subject. Required with a sink's subject_template. */
    subjects: z.array(z.string().min(1)).min(1).optional(),
    storage: z.enum(["file", "memory"]).default("file"),
    /** Messages older than this are removed by the server; 0 or absent keeps them (limits by default). */
    max_age_ms: z.number().int().min(0).optional(),
  })
  .optional();

export type CreateStream = NonNullable<z.output<typeof createStreamSchema>>;

/** Creates the stream `spec` names (or finds it, when another relay just did); returns its name. */
export async function createStream(
  jsm: JetStreamManager,
  spec: CreateStream,
  subject: string,
  ctx: PluginContext,
  where: string,
): Promise<string> {
  const subjects = spec.subjects ?? [subject];
  try {
    await jsm.streams.add({
      name: spec.name,
      subjects,
      storage: spec.storage === "memory" ? StorageType.Memory : StorageType.File,
      ...(spec.max_age_ms ? { max_age: spec.max_age_ms * 1_000_000 } : {}),
    });
    ctx.logger.info(`${where}: created JetStream stream "${spec.name}" for ${subjects.map((s) => `"${s}"`).join(", ")} (create_stream)`);
  } catch (error) {
    const existing = await jsm.streams.info(spec.name).catch(() => undefined);
    if (!existing) {
      throw ctx.errors.config(`${where}: 'create_stream': cannot create stream "${spec.name}": ${messageOf(error)}`);
    }
  }
  return spec.name;
}

/**
 * Which stream stores `subject` (a wildcard subject matches the streams it overlaps).
 * JetStream being off on the server counts as no stream.
 */
export async function findStream(jsm: JetStreamManager | undefined, subject: string): Promise<StreamLookup> {
  if (!jsm) return { none: "JetStream is not enabled on the server" };
  const names: string[] = [];
  for await (const name of jsm.streams.names(subject)) names.push(name);
  if (names.length === 1) return { stream: names[0]! };
  if (names.length === 0) return { none: `no JetStream stream covers subject "${subject}"` };
  return { ambiguous: names };
}

/** The message's headers as tide sees them: one string per name, a list when repeated. */
export function headersOf(headers: MsgHdrs | undefined): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {};
  if (!headers) return out;
  for (const [name, values] of headers) out[name] = values.length === 1 ? values[0]! : [...values];
  return out;
}

/**
 * The message's own id: `Nats-Msg-Id`, else its CloudEvents id (the `ce-id` header of binary
 * mode, or the `id` of a structured CloudEvents body); undefined when it carries none.
 */
export function eventIdOf(headers: MsgHdrs | undefined, payload: unknown): string | undefined {
  const header = headers?.get("Nats-Msg-Id") || headers?.get("ce-id", Match.IgnoreCase);
  return header || cloudEventId(payload);
}

/** A valid subject to publish to: dot-separated non-empty tokens, no wildcards or whitespace. */
export function isPublishSubject(subject: string): boolean {
  return /^[^\s.*>]+(\.[^\s.*>]+)*$/.test(subject);
}

/** A valid subject to subscribe to: like a publish subject, but `*` tokens and a final `>` are allowed. */
export function isFilterSubject(subject: string): boolean {
  return /^([^\s.*>]+|\*)(\.([^\s.*>]+|\*))*(\.>)?$|^>$/.test(subject);
}

/** Resolves once the server has seen everything sent before; rejects after `timeoutMs` (e.g. while reconnecting). */
export async function flushWithin(nc: NatsConnection, timeoutMs: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer from the server within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    await Promise.race([nc.flush(), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Which credentials the server refused, by config key (never their value). */
function authProblem(config: ConnectionConfig): string {
  if (config.token) return "the server refused the 'token'";
  if (config.user) return `the server refused 'user' "${config.user}" with its 'password'`;
  if (config.creds_file) return `the server refused the credentials in 'creds_file' (${config.creds_file})`;
  if (config.url.some((u) => /\/\/[^/@]*@/.test(u))) return "the server refused the credentials in 'url'";
  return "the server requires credentials: set 'token', 'user' and 'password', or 'creds_file'";
}

export function redactUrl(url: string): string {
  return url.replace(/\/\/[^/@]*@/, "//***@");
}

async function watchStatus(nc: NatsConnection, ctx: PluginContext, where: string): Promise<void> {
  try {
    for await (const status of nc.status()) {
      if (status.type === "disconnect") ctx.logger.warn(`${where}: disconnected from NATS, reconnecting`, { server: redactUrl(String(status.server)) });
      else if (status.type === "reconnect") ctx.logger.info(`${where}: reconnected to NATS`, { server: redactUrl(String(status.server)) });
      else if (status.type === "error") ctx.logger.warn(`${where}: NATS error`, { error: messageOf(status.error) });
    }
  } catch {
    // The iterator ends with the connection.
  }
}
