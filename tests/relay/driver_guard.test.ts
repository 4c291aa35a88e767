// The one patch tide still applies to a dependency (scripts/patch-deps.mjs: postgres.js's nextWrite
// on a closed socket, porsager/postgres#1208, unreleased) is in force where the relay runs: under
// Bun from a checkout and inside a binary built the way compile.sh builds the release.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";

const ROOT = join(import.meta.dir, "..", "..");
const SCRIPT = join(ROOT, "tests", "fixtures", "driver", "reserved_close.ts");

let db: TestDatabase;
let dir: string;
beforeAll(async () => {
  db = await createTestDatabase({ install: false });
  dir = await mkdtemp(join(tmpdir(), "tide-driver-"));
});
afterAll(async () => {
  await db?.drop();
  await rm(dir, { recursive: true, force: true });
});

async function run(command: string[]): Promise<unknown> {
  const child = Bun.spawn([...command, db.url], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
  const [stdout, stderr, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
  expect({ code, stderr }).toEqual({ code: 0, stderr: "" });
  return JSON.parse(stdout.trim());
}

// The server ended the session: every later query on the reserved connection is refused, none escapes.
const SURVIVES = { settled: ["CONNECTION_CLOSED", "CONNECTION_CLOSED", "CONNECTION_CLOSED"], uncaught: null };

describe("a reserved connection whose session the server ended", () => {
  it("refuses later queries with CONNECTION_CLOSED under Bun", async () => {
    expect(await run([process.execPath, SCRIPT])).toEqual(SURVIVES);
  }, 30_000);

  it("does the same inside a binary built as compile.sh builds the release", async () => {
    const binary = join(dir, "reserved-close");
    const build = Bun.spawnSync([process.execPath, "build", SCRIPT, "--compile", "--minify", "--sourcemap=none", "--outfile", binary], { cwd: ROOT });
    expect(build.exitCode).toBe(0);
    expect(await run([binary])).toEqual(SURVIVES);
  }, 60_000);
});
