// The worker example of docs/client.md, run as written: its SQL as the schema owner, its worker.mjs
// as a tide_publisher login on Bun and on Deno, until SIGTERM stops it cleanly.

import { afterAll, describe, expect, it } from "bun:test";
import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createTestDatabase, loginRole, type TestDatabase } from "../support/postgres.ts";
import { collectLines, waitFor } from "../support/relay.ts";

const ROOT = join(import.meta.dir, "..", "..");

/** The first ```sql and ```js blocks of the section "A worker, end to end". */
async function example(): Promise<{ setup: string; worker: string }> {
  const doc = await readFile(join(ROOT, "docs", "client.md"), "utf8");
  const section = doc.slice(doc.indexOf("## A worker, end to end"));
  const block = (lang: string) => {
    const start = section.indexOf("```" + lang + "\n") + lang.length + 4;
    return section.slice(start, section.indexOf("```", start));
  };
  return { setup: block("sql"), worker: block("js") };
}

const databases: TestDatabase[] = [];
const dirs: string[] = [];
afterAll(async () => {
  for (const db of databases) await db.drop();
  for (const dir of dirs) await rm(dir, { recursive: true, force: true });
});

const RUNTIMES: [string, string[]][] = [
  ["Bun", [process.execPath, "worker.mjs"]],
  ["Deno", [join(ROOT, "node_modules", ".bin", "deno"), "run", "-A", "worker.mjs"]],
];

describe("docs/client.md", () => {
  for (const [runtime, command] of RUNTIMES) {
    it(`its worker example processes the payments on ${runtime} and stops on SIGTERM`, async () => {
      const { setup, worker } = await example();
      const db = await createTestDatabase();
      databases.push(db);
      await db.sql.unsafe(setup);
      const app = await loginRole(db, "tide_publisher", "docs_worker");
      const dir = await mkdtemp(join(tmpdir(), "tide-docs-"));
      dirs.push(dir);
      await mkdir(join(dir, "node_modules"));
      await symlink(ROOT, join(dir, "node_modules", "pg-tide"));
      await symlink(join(ROOT, "node_modules", "postgres"), join(dir, "node_modules", "postgres"));
      await writeFile(join(dir, "package.json"), JSON.stringify({ type: "module", dependencies: { "pg-tide": "*", postgres: "*" } }));
      await writeFile(join(dir, "worker.mjs"), worker);

      const child = Bun.spawn(command, {
        cwd: dir,
        env: { ...process.env, DATABASE_URL: app.url, DENO_NO_UPDATE_CHECK: "1" },
        stdout: "pipe",
        stderr: "pipe",
      });
      const output = collectLines(child.stdout);
      const errors = collectLines(child.stderr);
      try {
        await waitFor("the three payments", () => output.lines.length >= 3, 30_000);
      } finally {
        child.kill("SIGTERM");
      }
      expect(await child.exited).toBe(0);
      await errors.done;
      expect(errors.lines.filter((line) => line.trim())).toEqual([]);
      expect(output.lines.toSorted()).toEqual([
        "payment pay-1 of 10 for acc-1 (attempt 1)",
        "payment pay-2 of 25.5 for acc-2 (attempt 1)",
        "payment pay-3 of 7.25 for acc-1 (attempt 1)",
      ]);
      // acc-1's payments were handled in order.
      expect(output.lines.indexOf("payment pay-1 of 10 for acc-1 (attempt 1)"))
        .toBeLessThan(output.lines.indexOf("payment pay-3 of 7.25 for acc-1 (attempt 1)"));
      const received = await db.sql`SELECT event_id, account_id, amount::text FROM payments_received ORDER BY event_id`;
      expect(received.map((r) => [r.event_id, r.account_id, r.amount])).toEqual([
        ["pay-1", "acc-1", "10"], ["pay-2", "acc-2", "25.5"], ["pay-3", "acc-1", "7.25"],
      ]);
      const receipts = await db.sql`SELECT payload->>'account_id' AS account FROM tide.outbox_messages WHERE outbox = 'receipts'`;
      expect(receipts).toHaveLength(3);
      const [stats] = await db.sql`SELECT pending, claimed FROM tide.inbox_stats WHERE inbox = 'payments'`;
      expect([stats.pending, stats.claimed]).toEqual([0n, 0n]);
    }, 60_000);
  }
});
