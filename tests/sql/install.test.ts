// Both install paths: `pg-tide install` (migrations) and CREATE EXTENSION pg_tide produce the same
// schema; installs are idempotent, survive a race, and refuse a schema newer than the binary.

import { afterAll, describe, expect, it } from "bun:test";
import { connect } from "../../core/db.ts";
import { installSchema, SCHEMA_VERSION } from "../../core/schema.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";

const databases: TestDatabase[] = [];
async function freshDatabase(): Promise<TestDatabase> {
  const db = await createTestDatabase({ install: false });
  databases.push(db);
  return db;
}
afterAll(async () => {
  for (const db of databases) await db.drop();
});

async function functionSignatures(db: TestDatabase): Promise<string[]> {
  const rows = await db.sql<{ signature: string }[]>`
    SELECT p.oid::regprocedure::text || ' -> ' || pg_get_function_result(p.oid)
           || CASE WHEN p.prosecdef THEN ' definer' ELSE '' END AS signature
      FROM pg_proc p WHERE p.pronamespace = 'tide'::regnamespace ORDER BY 1`;
  return rows.map((row) => row.signature);
}

async function relations(db: TestDatabase): Promise<string[]> {
  const rows = await db.sql<{ name: string }[]>`
    SELECT c.relname || ':' || c.relkind::text AS name FROM pg_class c
     WHERE c.relnamespace = 'tide'::regnamespace ORDER BY 1`;
  return rows.map((row) => row.name);
}

function runCli(args: string[]) {
  return Bun.spawnSync([process.execPath, "main.ts", ...args], { cwd: `${import.meta.dir}/../..` });
}

describe("pg-tide install", () => {
  it("applies every migration once and is a no-op the second time", async () => {
    const db = await freshDatabase();
    const first = runCli(["install", "--postgres-url", db.url]);
    expect(first.stderr.toString()).toBe("");
    expect(first.stdout.toString()).toContain(`now version ${SCHEMA_VERSION}`);
    const second = runCli(["install", "--postgres-url", db.url]);
    expect(second.exitCode).toBe(0);
    expect(second.stdout.toString()).toContain("up to date");
    const versions = await db.sql`SELECT version FROM tide.schema_migrations ORDER BY 1`;
    expect(versions.map((row) => row.version)).toEqual(Array.from({ length: SCHEMA_VERSION }, (_, i) => i + 1));
  });

  it("lets several installers race on one database and all succeed", async () => {
    const db = await freshDatabase();
    const clients = Array.from({ length: 4 }, () => connect(db.url, { max: 1 }));
    try {
      const results = await Promise.all(clients.map((client) => installSchema(client)));
      expect(results.map((r) => r.applied.length).sort()).toEqual([0, 0, 0, SCHEMA_VERSION]);
    } finally {
      await Promise.all(clients.map((client) => client.end()));
    }
  });

  it("refuses a schema newer than it understands", async () => {
    const db = await freshDatabase();
    await installSchema(db.sql);
    await db.sql`INSERT INTO tide.schema_migrations (version, name) VALUES (${SCHEMA_VERSION + 1}, 'from the future')`;
    const result = runCli(["install", "--postgres-url", db.url]);
    expect(result.exitCode).toBe(2);
    expect(result.stderr.toString()).toContain(`version ${SCHEMA_VERSION + 1}, newer than this pg-tide`);
  });

  it("says what is missing when no URL is given", () => {
    const result = Bun.spawnSync([process.execPath, "main.ts", "install"], {
      cwd: `${import.meta.dir}/../..`,
      env: { ...process.env, PG_TIDE_POSTGRES_URL: "" },
    });
    expect(result.exitCode).toBe(2);
    expect(result.stderr.toString()).toContain("--postgres-url URL (or PG_TIDE_POSTGRES_URL) installs it into that database");
  });
});

describe("CREATE EXTENSION pg_tide", () => {
  it("installs the same functions and relations as pg-tide install", async () => {
    const viaInstall = await freshDatabase();
    await installSchema(viaInstall.sql);

    const viaExtension = await freshDatabase();
    const [{ setting: sharedir }] = await viaExtension.sql`SELECT setting FROM pg_config WHERE name = 'SHAREDIR'`;
    const written = runCli(["install", "--extension-dir", `${sharedir}/extension`]);
    expect(written.exitCode).toBe(0);
    await viaExtension.sql`CREATE EXTENSION pg_tide`;

    expect(await functionSignatures(viaExtension)).toEqual(await functionSignatures(viaInstall));
    expect(await relations(viaExtension)).toEqual(await relations(viaInstall));
    // The installer recognises the extension's schema as current.
    expect((await installSchema(viaExtension.sql)).applied).toEqual([]);
    // And it works: publish and read back.
    await viaExtension.sql`SELECT tide.outbox_create('orders')`;
    await viaExtension.sql`SELECT tide.outbox_publish('orders', '{"a": 1}'::jsonb)`;
    const [row] = await viaExtension.sql`SELECT payload FROM tide.outbox_messages`;
    expect(row.payload).toEqual({ a: 1 });
  });
});
