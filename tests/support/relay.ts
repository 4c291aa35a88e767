// Running the relay in tests: in-process (to inspect its state) or as a child process (to kill -9
// it), plus small helpers to wait for conditions instead of sleeping.

import { readFile } from "node:fs/promises";
import { createLogger, type Logger } from "../../core/log.ts";
import { PluginRegistry } from "../../core/plugins.ts";
import { Relay, type RelayOptions } from "../../core/relay.ts";
import { builtinPlugins } from "../../plugins/registry.ts";

const ROOT = `${import.meta.dir}/../..`;

/** A logger that keeps its lines for assertions (and prints nothing). */
export function captureLogger(): { logger: Logger; lines: string[] } {
  const lines: string[] = [];
  return { logger: createLogger({ level: "debug", format: "json", write: (line) => void lines.push(line) }), lines };
}

export async function startRelay(url: string, options: Partial<RelayOptions> = {}): Promise<Relay> {
  const relay = new Relay({
    postgresUrl: url,
    relayGroupId: "default",
    logger: options.logger ?? captureLogger().logger,
    registry: new PluginRegistry(builtinPlugins),
    pollIntervalMs: 50,
    reconcileIntervalMs: 300,
    ...options,
  });
  await relay.start();
  return relay;
}

/** Polls `check` until it returns a truthy value; fails with `what` after timeoutMs. */
export async function waitFor<T>(
  what: string,
  check: () => Promise<T> | T,
  timeoutMs = 20_000,
): Promise<NonNullable<Exclude<T, false | 0 | "">>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await check();
      if (value) return value as NonNullable<Exclude<T, false | 0 | "">>;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${last}` : ""}`);
    await Bun.sleep(25);
  }
}

/** The JSON lines of a file sink's output (missing file: none). */
export async function readJsonl(path: string): Promise<any[]> {
  const text = await readFile(path, "utf8").catch(() => "");
  return text.split("\n").filter(Boolean).map((line) => JSON.parse(line));
}

/** Starts `pg-tide run` as a child process, as a user would. */
export function spawnRelay(url: string, extra: string[] = [], env: Record<string, string> = {}) {
  return Bun.spawn([process.execPath, "main.ts", "run", "--postgres-url", url, "--poll-interval-ms", "50", "--metrics-addr", "127.0.0.1:0", ...extra], {
    cwd: ROOT,
    env: { ...process.env, ...env },
    stdout: "pipe",
    stderr: "pipe",
  });
}

/**
 * Collects a child process's output lines as they arrive (a relay's logs go to stderr), so that a
 * test can wait for one with waitFor. `done` resolves when the stream ends.
 */
export function collectLines(stream: ReadableStream<Uint8Array>): { lines: string[]; done: Promise<void> } {
  const lines: string[] = [];
  const done = (async () => {
    const decoder = new TextDecoder();
    let rest = "";
    const reader = stream.getReader();
    for (let read = await reader.read(); !read.done; read = await reader.read()) {
      const parts = (rest + decoder.decode(read.value, { stream: true })).split("\n");
      rest = parts.pop()!;
      lines.push(...parts);
    }
    if (rest) lines.push(rest);
  })();
  return { lines, done };
}

/**
 * A webhook target that holds every request until the test lets it answer (then 200): a delivery
 * in flight for exactly as long as the test needs, without timing assumptions.
 */
export function heldWebhook() {
  const keys: string[] = [];
  const arrived = Promise.withResolvers<void>();
  const release = Promise.withResolvers<void>();
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(request) {
      keys.push(request.headers.get("idempotency-key") ?? "");
      arrived.resolve();
      await release.promise;
      return new Response("ok");
    },
  });
  return {
    url: `http://127.0.0.1:${server.port}/hook`,
    /** Idempotency-Key of every request received, answered or not. */
    keys,
    /** Resolves when the first request is in flight. */
    arrived: arrived.promise,
    /** Answers the held requests and every later one. */
    release: () => release.resolve(),
    stop: () => server.stop(true),
  };
}
