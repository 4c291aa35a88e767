// Idle memory: what a relay holds with nothing to deliver. For each count of pipelines (file sinks,
// `--pipelines 0,10` by default), a fresh database gets that many outboxes and pipelines, `bun
// main.ts run` starts with its default flags, and once every pipeline logged "pipeline started" the
// relay is left alone for `--settle-seconds` (default 12: its chores and a few probe rounds run)
// before its VmRSS is read from /proc. Runs alternate between the counts.
//
//   ./node_modules/.bin/bun bench/idle.ts [--pipelines 0,10] [--runs 3] [--settle-seconds 12]

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connectTo, describeMachine, fixed, intFlag, markdownTable, medianRun, scratchDatabase, spawnRelay } from "./support.ts";

const RUNS = intFlag("runs", 3);
const SETTLE_MS = intFlag("settle-seconds", 12) * 1000;
const flag = process.argv.indexOf("--pipelines");
const COUNTS = flag > 0 ? process.argv[flag + 1].split(",").map(Number) : [0, 10];
if (COUNTS.some((n) => !Number.isInteger(n) || n < 0)) throw new Error("--pipelines takes counts such as 0,10");

console.log(await describeMachine());
console.log(`idle relay: pipelines ${COUNTS.join(", ")}; ${RUNS} runs; VmRSS after ${SETTLE_MS / 1000} s idle\n`);

const results = new Map<number, { rss: number; peak: number }[]>(COUNTS.map((n) => [n, []]));
for (let run = 1; run <= RUNS; run++) {
  for (const count of run % 2 ? COUNTS : [...COUNTS].reverse()) {
    const db = await scratchDatabase("idle");
    const dir = mkdtempSync(join(tmpdir(), "tide-idle-"));
    const sql = connectTo(db.url);
    let relay: ReturnType<typeof spawnRelay> | undefined;
    try {
      for (let i = 0; i < count; i++) {
        await sql`SELECT tide.outbox_create(${`idle_${i}`})`;
        await sql`SELECT tide.relay_set_outbox(${`idle-${i}`}, ${`idle_${i}`}, 'file', ${sql.json({ path: join(dir, `${i}.jsonl`) })})`;
      }
      relay = spawnRelay(db.url);
      await relay.logged(count > 0 ? "pipeline started" : "relay started");
      for (;;) {
        const [{ running }] = await sql`SELECT count(*)::int AS running FROM tide.relay_pipeline_state WHERE owner_id IS NOT NULL`;
        if (running >= count) break;
        await Bun.sleep(100);
      }
      await Bun.sleep(SETTLE_MS);
      const { rssMiB, peakMiB } = relay.memory();
      results.get(count)!.push({ rss: rssMiB, peak: peakMiB });
      console.log(`run ${run}, ${count} pipelines: RSS ${fixed(rssMiB, 0)} MiB (peak ${fixed(peakMiB, 0)})`);
    } finally {
      await relay?.stop();
      await sql.end();
      await db.drop();
      rmSync(dir, { recursive: true, force: true });
    }
  }
}

console.log("\n" + markdownTable(["pipelines", "idle RSS MiB (median run)", "range", "peak MiB (that run)"],
  COUNTS.map((n) => {
    const runs = results.get(n)!;
    const rss = runs.map((r) => r.rss);
    const median = medianRun(runs, (r) => r.rss);
    return [n, fixed(median.rss, 0), `${fixed(Math.min(...rss), 0)}–${fixed(Math.max(...rss), 0)}`, fixed(median.peak, 0)];
  })));
