// Everything that differs between Bun and Deno lives here: environment, signals, process exit and
// serving HTTP. The rest of tide calls these and never touches a runtime global directly.

import process from "node:process";

declare const Deno: any;
declare const Bun: any;

export const runtimeName: "bun" | "deno" | "node" =
  typeof Bun !== "undefined" ? "bun" : typeof Deno !== "undefined" ? "deno" : "node";

export function env(name: string): string | undefined {
  return process.env[name];
}

export function argv(): string[] {
  return process.argv.slice(2);
}

export function exit(code: number): never {
  process.exit(code);
}

export type SignalName = "SIGTERM" | "SIGINT" | "SIGHUP";

/** Registers a handler; returns a function that removes it. */
export function onSignal(signal: SignalName, handler: () => void): () => void {
  process.on(signal, handler);
  return () => process.off(signal, handler);
}

export function writeStdout(text: string): void {
  process.stdout.write(text);
}

export function writeStderr(text: string): void {
  process.stderr.write(text);
}

export interface HttpServer {
  port: number;
  stop(): Promise<void>;
}

/** Serves a fetch handler (Hono's app.fetch) on host:port with the runtime's native server. */
export function serve(fetch: (request: Request) => Response | Promise<Response>, host: string, port: number): HttpServer {
  if (runtimeName === "bun") {
    const server = Bun.serve({ fetch, hostname: host, port });
    return { port: server.port, stop: async () => void server.stop(true) };
  }
  if (runtimeName === "deno") {
    const server = Deno.serve({ hostname: host, port, onListen: () => {} }, fetch);
    return { port: server.addr.port, stop: () => server.shutdown() };
  }
  throw new Error("pg-tide serves HTTP on Bun or Deno; run it with one of them");
}

/**
 * The relay's soft memory ceiling. Bun's heap grows with the machine's memory rather than with what
 * the relay holds: during a backlog drain dead batches pile up until its collector gets round to
 * them (100,000 messages of 1 KiB: ~200 MiB resident, 230 after 300,000). Every GC_CHECK_BYTES of
 * message payload handled, the resident size is looked at, and only above the target is a full
 * collection forced (which also hands freed memory back to the system). Forced on every check, the
 * collections were 11-20 % of the relay's CPU samples while draining; below the target, none is.
 */
export const DEFAULT_MEMORY_TARGET_MIB = 256;
const GC_CHECK_BYTES = 16 * 1024 * 1024;
let memoryTargetBytes = DEFAULT_MEMORY_TARGET_MIB * 1024 * 1024;
let handledSinceCheck = 0;
let forcedCollections = 0;

/** Sets the soft memory ceiling (`pg-tide run --memory-target-mib`). */
export function setMemoryTarget(mib: number): void {
  memoryTargetBytes = mib * 1024 * 1024;
}

/** How many full collections handled() has forced so far. */
export function forcedCollectionCount(): number {
  return forcedCollections;
}

/** Notes `bytes` of message payload handled; now and then, above the memory target, collects garbage. */
export function handled(bytes: number): void {
  handledSinceCheck += bytes;
  if (handledSinceCheck < GC_CHECK_BYTES) return;
  handledSinceCheck = 0;
  if (typeof Bun === "undefined" || process.memoryUsage.rss() <= memoryTargetBytes) return;
  forcedCollections += 1;
  Bun.gc(true);
}
