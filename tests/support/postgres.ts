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
  /** The LOGIN roles loginRole() made for this database; drop() drops them. */
  readonly roles: string[];
  /** Closes every connection this helper opened, drops the database, then its LOGIN roles. */
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
  const roles: string[] = [];
  return {
    name,
    url,
    sql,
    roles,
    async drop() {
      await sql.end({ timeout: 5 });
      const admin = connect(await serverUrl(), { max: 1 });
      try {
        await admin.unsafe(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
        // Roles belong to the server, not the database: dropped last, once nothing they own is left.
        for (const role of roles) await admin.unsafe(`DROP ROLE IF EXISTS ${role}`);
      } finally {
        await admin.end();
      }
    },
  };
}

export type TideRole = "tide_publisher" | "tide_reader" | "tide_relay";

/**
 * A new LOGIN role "tide_test_<label>_<random>" that holds only `grant` (no tide role when null),
 * dropped by db.drop(); returns its name and a URL of the database that logs in as it.
 */
export async function loginRole(db: TestDatabase, grant: TideRole | null, label: string): Promise<{ name: string; url: string }> {
  const name = `tide_test_${label}_${Math.random().toString(36).slice(2, 10)}`;
  if (!/^[a-z0-9_]+$/.test(label) || name.length > 63) {
    throw new Error(`loginRole: label "${label}" must be lower-case letters, digits and "_", at most ${63 - 19} characters`);
  }
  // A password, because not every server trusts local logins (the embedded PostgreSQL asks for one).
  const password = Math.random().toString(36).slice(2, 14);
  await db.sql.unsafe(`CREATE ROLE ${name} LOGIN PASSWORD '${password}'`);
  db.roles.push(name);
  if (grant) await db.sql.unsafe(`GRANT ${grant} TO ${name}`);
  const url = new URL(db.url);
  url.username = name;
  url.password = password;
  return { name, url: url.toString() };
}

export function withDatabase(url: string, database: string): string {
  const parsed = new URL(url);
  parsed.pathname = `/${database}`;
  return parsed.toString();
}
