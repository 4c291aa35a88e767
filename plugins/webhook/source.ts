// Source "webhook": an HTTP route on the relay's server (/ingest/<path>) that writes each request
// into the pipeline's inbox. The caller gets 200 only after the inbox row is committed (202 would
// promise less), 401 for a bad signature, 413 for an oversize body, 503 when writing failed.
// Signatures: a plain HMAC-SHA256 of the body, GitHub, Stripe, and Standard Webhooks.

import { Buffer } from "node:buffer";
import { createHash, createHmac, timingSafeEqual } from "node:crypto";
import { z } from "zod";
import type { InboundMessage, SourceBatch, SourceDefinition } from "../../core/plugin.ts";
import { cloudEventId } from "../shared.ts";
import { secretBytes } from "./sign.ts";

const configSchema = z.strictObject({
  /** Served at /ingest/<path> on --metrics-addr. */
  path: z.string().regex(/^\/?[A-Za-z0-9_.~-]+(\/[A-Za-z0-9_.~-]+)*\/?$/, "must be a URL path like \"payments\""),
  signature: z.strictObject({
    scheme: z.enum(["hmac-sha256", "github", "stripe", "standard-webhooks"]),
    secret: z.string().min(1),
    /** hmac-sha256 only: the header carrying `sha256=<hex>` (default X-Tide-Signature). */
    header: z.string().min(1).optional(),
    /** stripe and standard-webhooks: how old a signed timestamp may be. */
    tolerance_seconds: z.number().int().positive().default(300),
  }).optional(),
  max_body_bytes: z.number().int().positive().default(1_048_576),
  /** How long a request waits for its inbox commit before answering 503. */
  timeout_ms: z.number().int().positive().default(30_000),
});

export type WebhookSourceConfig = z.output<typeof configSchema>;

interface Pending {
  message: InboundMessage;
  settle: (response: Response) => void;
}

export const webhookSource: SourceDefinition<WebhookSourceConfig> = {
  type: "webhook",
  kind: "source",
  summary: "Receives HTTP POSTs at /ingest/<path> on the relay and writes them into the inbox",
  config: configSchema,
  example: { path: "payments", signature: { scheme: "standard-webhooks", secret: "whsec_c2VjcmV0LWtleQ==" } },
  create(config, ctx) {
    const queue: Pending[] = [];
    let waiting: (() => void) | undefined;
    let unroute: (() => void) | undefined;

    async function handle(request: Request): Promise<Response> {
      if (request.method !== "POST") return text(405, "use POST");
      const declared = Number(request.headers.get("content-length") ?? "0");
      if (declared > config.max_body_bytes) return text(413, `body larger than ${config.max_body_bytes} bytes`);
      // Signatures are over the bytes as sent; the text is only decoded for the payload.
      const body = await readLimited(request, config.max_body_bytes);
      if (body === undefined) return text(413, `body larger than ${config.max_body_bytes} bytes`);
      if (config.signature) {
        const problem = verify(config.signature, request.headers, body);
        if (problem) {
          ctx.logger.warn("webhook rejected", { reason: problem });
          return text(401, `invalid signature: ${problem}`);
        }
      }
      const message = toMessage(request, body);
      return await new Promise<Response>((resolve) => {
        const timer = setTimeout(() => resolve(text(503, "the inbox did not commit in time; retry")), config.timeout_ms);
        queue.push({ message, settle: (response) => (clearTimeout(timer), resolve(response)) });
        waiting?.();
      });
    }

    return {
      async connect() {
        if (!ctx.http) {
          throw ctx.errors.config(`webhook source "${ctx.pipeline}": the relay serves no HTTP; set --metrics-addr`);
        }
        unroute ??= ctx.http.route(config.path, handle);
      },
      async read(): Promise<SourceBatch | null> {
        while (queue.length === 0) {
          if (ctx.signal.aborted) return null;
          await new Promise<void>((resolve) => {
            waiting = resolve;
            ctx.signal.addEventListener("abort", () => resolve(), { once: true });
          });
          waiting = undefined;
        }
        const taken = queue.splice(0, ctx.batchSize);
        return {
          messages: taken.map((p) => p.message),
          async ack() {
            for (const p of taken) p.settle(json(200, { status: "accepted", event_id: p.message.eventId ?? null }));
          },
          async nack(error) {
            for (const p of taken) p.settle(text(503, `could not store the message: ${error.message}`));
          },
        };
      },
      async close() {
        unroute?.();
        unroute = undefined;
        for (const p of queue.splice(0)) p.settle(text(503, "the pipeline is stopping; retry"));
      },
    };
  },
};

/** Returns why the signature is not valid, or undefined when it is. */
function verify(sig: NonNullable<WebhookSourceConfig["signature"]>, headers: Headers, body: Uint8Array): string | undefined {
  const now = Math.floor(Date.now() / 1000);
  const hmac = (key: Uint8Array | string, prefix: string) => createHmac("sha256", key).update(prefix).update(body).digest();
  switch (sig.scheme) {
    case "hmac-sha256":
    case "github": {
      const name = sig.scheme === "github" ? "x-hub-signature-256" : (sig.header ?? "x-tide-signature");
      const given = headers.get(name);
      if (!given?.startsWith("sha256=")) return `missing ${name}: sha256=<hex>`;
      return same(given.slice(7), hmac(sig.secret, "").toString("hex")) ? undefined : `${name} does not match`;
    }
    case "stripe": {
      const header = headers.get("stripe-signature");
      if (!header) return "missing Stripe-Signature";
      const parts = header.split(",").map((p) => p.split("=", 2) as [string, string]);
      const t = parts.find(([k]) => k === "t")?.[1];
      if (!t || Math.abs(now - Number(t)) > sig.tolerance_seconds) return "timestamp missing or outside the tolerance";
      const expected = hmac(sig.secret, `${t}.`).toString("hex");
      return parts.some(([k, v]) => k === "v1" && same(v, expected)) ? undefined : "no v1 signature matches";
    }
    case "standard-webhooks": {
      const id = headers.get("webhook-id");
      const t = headers.get("webhook-timestamp");
      const given = headers.get("webhook-signature");
      if (!id || !t || !given) return "missing webhook-id, webhook-timestamp or webhook-signature";
      if (Math.abs(now - Number(t)) > sig.tolerance_seconds) return "timestamp outside the tolerance";
      const expected = hmac(secretBytes("standard-webhooks", sig.secret), `${id}.${t}.`).toString("base64");
      return given.split(" ").some((s) => s.startsWith("v1,") && same(s.slice(3), expected)) ? undefined : "no v1 signature matches";
    }
  }
}

function toMessage(request: Request, bytes: Uint8Array): InboundMessage {
  const body = new TextDecoder().decode(bytes);
  let payload: unknown = body;
  try {
    payload = JSON.parse(body);
  } catch {
    // not JSON: stored as a JSON string
  }
  const headers: Record<string, string> = {};
  request.headers.forEach((value, key) => {
    if (!/^(authorization|cookie|.*signature.*)$/i.test(key)) headers[key] = value;
  });
  const stripeId = typeof payload === "object" && payload !== null && typeof (payload as any).id === "string" &&
      request.headers.has("stripe-signature")
    ? (payload as any).id as string
    : undefined;
  const eventId = request.headers.get("webhook-id") ?? request.headers.get("x-github-delivery") ?? stripeId ??
    request.headers.get("idempotency-key") ?? request.headers.get("ce-id") ?? cloudEventId(payload);
  return {
    eventId,
    // The same body sent twice (a client retry without an id) maps to the same row.
    transportId: `webhook:${createHash("sha256").update(bytes).digest("hex").slice(0, 32)}`,
    payload,
    headers,
    source: `webhook:${new URL(request.url).pathname}`,
  };
}

async function readLimited(request: Request, limit: number): Promise<Uint8Array | undefined> {
  const reader = request.body?.getReader();
  if (!reader) return new Uint8Array();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel();
      return undefined;
    }
    chunks.push(value);
  }
  return Buffer.concat(chunks);
}

function same(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

function text(status: number, message: string): Response {
  return new Response(message + "\n", { status, headers: { "content-type": "text/plain" } });
}

function json(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });
}
