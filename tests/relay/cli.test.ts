// The command line as a user meets it: help everywhere, check against the catalog, manifests that
// declare pipelines (or are told to leave the catalog alone), and clear errors for bad flags.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { spawnRelay, waitFor } from "../support/relay.ts";

const ROOT = join(import.meta.dir, "..", "..");
let db: TestDatabase;
let dir: string;
beforeAll(async () => {
  db = await createTestDatabase();
  dir = await mkdtemp(join(tmpdir(), "tide-cli-"));
});
afterAll(() => db.drop());

async function pgTide(...args: string[]) {
  const child = Bun.spawn([process.execPath, "main.ts", ...args], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
  const [stdout, stderr, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
  return { stdout, stderr, code };
}

describe("pg-tide", () => {
  it("explains every command with --help", async () => {
    const main = await pgTide("--help");
    for (const command of ["run", "dev", "install", "check", "plugins", "status", "version"]) {
      expect(main.stdout).toContain(`  ${command}`);
      const help = await pgTide(command, "--help");
      expect(help.code).toBe(0);
      expect(help.stdout).toContain("Usage: ");
    }
  }, 60_000);

  it("names an unknown command, an unknown flag and a bad value", async () => {
    const unknown = await pgTide("frobnicate");
    expect([unknown.code, unknown.stderr]).toEqual([2, expect.stringContaining('unknown command "frobnicate"')]);
    const flag = await pgTide("run", "--postgres-url", db.url, "--bogus");
    expect(flag.code).toBe(2);
    expect(flag.stderr).toContain("--bogus");
    const value = await pgTide("run", "--postgres-url", db.url, "--log-format", "xml");
    expect(value.stderr).toContain('--log-format must be "text" or "json" (got "xml")');
  });

  it("check finds a bad pipeline config in the catalog without connecting to its sink", async () => {
    await db.sql`SELECT tide.outbox_create('checked')`;
    await db.sql`SELECT tide.relay_set_outbox('good', 'checked', 'webhook', '{"url": "http://127.0.0.1:1/"}'::jsonb)`;
    await db.sql`SELECT tide.relay_set_outbox('bad', 'checked', 'webhook', '{"url": "http://127.0.0.1:1/", "timeout_ms": "soon"}'::jsonb)`;
    await db.sql`SELECT tide.relay_set_outbox('bad-filter', 'checked', 'stdout', '{"transform": {"filter": "payload.x =="}}'::jsonb)`;
    const result = await pgTide("check", "--postgres-url", db.url);
    expect(result.code).toBe(1);
    expect(result.stdout).toContain("1 of 3 pipeline configs are valid");
    expect(result.stdout).toContain(`pipeline "bad": webhook sink config is invalid: 'timeout_ms'`);
    expect(result.stdout).toContain(`pipeline "bad-filter": transform.filter: invalid filter`);
    await db.sql`SELECT tide.relay_delete('bad')`;
    await db.sql`SELECT tide.relay_delete('bad-filter')`;
    expect((await pgTide("check", "--postgres-url", db.url)).code).toBe(0);
  });

  it("upserts a manifest's pipelines at start, or leaves the catalog alone with catalog_only", async () => {
    await db.sql`SELECT tide.outbox_create('declared')`;
    const manifest = (mode: string) => `
[relay]
pipelines_mode = "${mode}"

[[pipelines]]
name = "declared-${mode}"
outbox = "declared"
sink_type = "file"
batch_size = 7
[pipelines.config]
path = "${join(dir, `${mode}.jsonl`)}"
`;
    for (const mode of ["catalog_only", "manifest"]) {
      const path = join(dir, `${mode}.toml`);
      await writeFile(path, manifest(mode));
      const relay = spawnRelay(db.url, ["--config", path, "--relay-group-id", mode]);
      try {
        await waitFor("the relay to own the pipelines it found", async () =>
          (await db.sql`SELECT 1 FROM tide.relay_pipeline_state WHERE relay_group_id = ${mode} AND pipeline = 'good'`).length > 0);
      } finally {
        relay.kill("SIGTERM");
        await relay.exited;
      }
    }
    const rows = await db.sql`SELECT name, batch_size, plugin_type FROM tide.relay_pipelines WHERE name LIKE 'declared-%'`;
    expect(rows.map((r) => [r.name, r.batch_size, r.plugin_type])).toEqual([["declared-manifest", 7, "file"]]);
  }, 60_000);
});
