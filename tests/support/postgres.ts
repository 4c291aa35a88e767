// PostgreSQL for tests: the server at DATABASE_URL when set, else an embedded PostgreSQL 18 started
// once per test run. Every suite gets a fresh database of its own, with the tide schema installed.

import { connect, type Sql } from "../../core/db.ts";
import { installSchema } from "../../core/schema.ts";
import { startEmbeddedPostgres } from "../../core/embedded.ts";

export { freePort } from "../../core/embedded.ts";

export interface TestDatabase {
  name: string;
  url: string;
  sql: Sql;
  /** Closes every connection this helper opened and drops the database. */
  drop(): Promise<void>;
}

let server: Promise<{ url: string; stop(): Promise<void> }> | undefined;

/** The server's admin URL (database "postgres"). Starts the embedded server on first use. */
export function serverUrl(): Promise<string> {
  server ??= process.env.DATABASE_URL
    ? Promise.resolve({ url: process.env.DATABASE_URL, stop: async () => {} })
    : startEmbeddedPostgres();
  return server.then((s) => s.url);
}

/** Stops the embedded server, if this run started one (the test preload calls it). */
export async function stopServer(): Promise<void> {
  if (server) await (await server).stop();
  server = undefined;
}

/** A new, empty database; `install: true` (the default) installs the tide schema in it. */
export async function createTestDatabase(options: { install?: boolean } = {}): Promise<TestDatabase> {
  const admin = connect(await serverUrl(), { max: 1 });
  const name = `tide_test_${process.pid}_${Math.random().toString(36).slice(2, 10)}`;
  try {
    await admin.unsafe(`CREATE DATABASE ${name}`);
  } finally {
    await admin.end();
  }
  const url = withDatabase(await serverUrl(), name);
  const sql = connect(url, { max: 8 });
  if (options.install !== false) await installSchema(sql);
  return {
    name,
    url,
    sql,
    async drop() {
      await sql.end({ timeout: 5 });
      const admin = connect(await serverUrl(), { max: 1 });
      try {
        await admin.unsafe(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      } finally {
        await admin.end();
      }
    },
  };
}

export function withDatabase(url: string, database: string): string {
  const parsed = new URL(url);
  parsed.pathname = `/${database}`;
  return parsed.toString();
}
