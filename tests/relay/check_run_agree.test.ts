// `pg-tide check --postgres-url` refuses what `pg-tide run` would refuse when it writes a manifest's
// pipelines into the catalog (an outbox that does not exist), in the same words, and changes nothing.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";

const ROOT = join(import.meta.dir, "..", "..");
let db: TestDatabase;
let dir: string;
beforeAll(async () => {
  db = await createTestDatabase();
  dir = await mkdtemp(join(tmpdir(), "tide-agree-"));
});
afterAll(() => db.drop());

async function pgTide(...args: string[]) {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("PG_TIDE_")));
  const child = Bun.spawn([process.execPath, "main.ts", ...args], { cwd: ROOT, env, stdout: "pipe", stderr: "pipe" });
  const [stdout, stderr, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
  return { stdout, stderr, code };
}

describe("check and run agree", () => {
  it("refuses a manifest pipeline whose outbox does not exist, as run does, and writes nothing", async () => {
    await db.sql`SELECT tide.outbox_create('agree_orders')`;
    const path = join(dir, "pg-tide.toml");
    await writeFile(path, `
[[pipelines]]
name = "exists"
outbox = "agree_orders"
sink_type = "file"
[pipelines.config]
path = "${join(dir, "a.jsonl")}"

[[pipelines]]
name = "missing-outbox"
outbox = "no_such_outbox"
sink_type = "file"
[pipelines.config]
path = "${join(dir, "b.jsonl")}"
`);
    const check = await pgTide("check", "--config", path, "--postgres-url", db.url);
    expect(check.code).toBe(1);
    expect(check.stdout).toContain("1 of 2 pipeline configs are valid (manifest and catalog)");
    const line = check.stdout.split("\n").find((l) => l.includes(`pipeline "missing-outbox" (manifest): the catalog refused it:`));
    expect(line).toBeDefined();
    expect(line).toContain("no_such_outbox");
    // Nothing was written: check rolls its upserts back.
    expect((await db.sql`SELECT count(*)::int AS n FROM tide.relay_pipelines`)[0].n).toBe(0);

    const run = await pgTide("run", "--config", path, "--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0");
    expect(run.code).not.toBe(0);
    expect(run.stderr).toContain(line!.trim());
  });
});
