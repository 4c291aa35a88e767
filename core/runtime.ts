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
 * Bytes of message text handled since the last hint; every GC_HINT_BYTES, Bun's collector is asked
 * to run (without blocking). Its heap otherwise grows with the machine's memory, not with what the
 * relay holds: a backlog drain would leave hundreds of MiB of dead batches resident.
 */
let handledSinceHint = 0;
const GC_HINT_BYTES = 16 * 1024 * 1024;

/** Notes `bytes` of message text handled; now and then lets the garbage collector catch up. */
export function handled(bytes: number): void {
  handledSinceHint += bytes;
  if (handledSinceHint < GC_HINT_BYTES) return;
  handledSinceHint = 0;
  if (typeof Bun !== "undefined") Bun.gc(true);
}
