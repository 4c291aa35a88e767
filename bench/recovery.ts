// Recovery: how soon a relay delivers again after PostgreSQL comes back, what happens when its lock
// session is terminated while it delivers, and how long SIGTERM takes after that. Each figure is
// measured for this checkout and, in the same run, for another tree given with --baseline DIR (an
// older commit checked out with `git worktree add`), so the comparison shares the machine's noise.
//
//   [BASELINE_LABEL=c55745a] ./node_modules/.bin/bun bench/recovery.ts [--runs 3] [--down-seconds 44] [--baseline DIR]
//
// The PostgreSQL is a private embedded one (it is stopped and started). The webhook target is a
// Bun.serve in this process recording each Idempotency-Key. Times are from this process's clock.

import { connect, type Sql } from "../core/db.ts";
import { recordingWebhook, startRestartablePostgres, type RestartablePostgres } from "../tests/support/chaos.ts";
import { collectLines } from "../tests/support/relay.ts";
import { withDatabase } from "../tests/support/postgres.ts";
import { describeMachine, fixed, intFlag, markdownTable, summarize } from "./support.ts";

const RUNS = intFlag("runs", 3);
const DOWN_SECONDS = intFlag("down-seconds", 44);
const BASELINE = process.argv.includes("--baseline") ? process.argv[process.argv.indexOf("--baseline") + 1] : undefined;
const HERE = `${import.meta.dir}/..`;

interface Tree {
  label: string;
  dir: string;
}

function spawnRelay(tree: Tree, url: string, group: string) {
  const child = Bun.spawn([process.execPath, "main.ts", "run", "--postgres-url", url, "--relay-group-id", group,
    "--metrics-addr", "off", "--log-format", "json"], { cwd: tree.dir, stdout: "ignore", stderr: "pipe" });
  return { child, log: collectLines(child.stderr) };
}

async function until(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await Promise.resolve().then(check).catch(() => false))) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(5);
  }
}

async function lockHolder(sql: Sql, group: string, pipeline: string): Promise<number | undefined> {
  const [row] = await sql<{ pid: number }[]>`
    SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2
       AND classid::int = hashtext(${group}) AND objid::int = hashtext(${pipeline})`;
  return row?.pid;
}

/** PostgreSQL down for `downMs`, then up: ms from "accepting connections" to the first new delivery. */
async function resumeAfterOutage(tree: Tree, pg: RestartablePostgres, url: string, downMs: number): Promise<number> {
  const hook = recordingWebhook();
  const group = `resume_${Math.random().toString(36).slice(2, 8)}`;
  let sql = connect(url, { max: 1 });
  await sql`SELECT tide.relay_set_outbox(${group}, 'bench', 'webhook', ${sql.json({ url: hook.url })})`;
  const relay = spawnRelay(tree, url, "default");
  try {
    await sql`SELECT tide.outbox_publish('bench', '{"warm": true}'::jsonb)`;
    await until("the first delivery", () => hook.arrivals.length > 0);
    await sql.end();
    await pg.stop();
    await Bun.sleep(downMs); // the outage itself
    await pg.start();
    const up = performance.now();
    sql = connect(url, { max: 1 });
    const [{ id }] = await sql<{ id: bigint }[]>`SELECT tide.outbox_publish('bench', '{"after": true}'::jsonb) AS id`;
    await until("the first delivery after the restart", () => hook.arrivals.some((a) => a.id === id));
    return performance.now() - up;
  } finally {
    relay.child.kill("SIGKILL");
    await relay.child.exited;
    await sql`SELECT tide.relay_delete(${group})`.catch(() => {});
    await sql.end();
    hook.stop();
  }
}

/**
 * Two relays, a steady stream, and the owner's lock session terminated: duplicates delivered, ms
 * until the old owner stops (says so, or the new owner's deliveries are the only ones), and ms for
 * the old owner to exit on SIGTERM afterwards.
 */
async function lockLoss(tree: Tree, url: string): Promise<{ duplicates: number; sigtermMs: number }> {
  const hook = recordingWebhook();
  const group = `loss_${Math.random().toString(36).slice(2, 8)}`;
  const sql = connect(url, { max: 2 });
  await sql`SELECT tide.outbox_create(${group})`;
  await sql`SELECT tide.relay_set_outbox(${group}, ${group}, 'webhook', ${sql.json({ url: hook.url })})`;
  const a = spawnRelay(tree, url, group);
  let stop = false;
  const publisher = (async () => {
    for (let n = 0; !stop; n++) {
      await sql`SELECT tide.outbox_publish(${group}, ${sql.json({ n })})`;
      await Bun.sleep(2);
    }
  })();
  try {
    await until("the first relay to own the pipeline", async () => (await lockHolder(sql, group, group)) !== undefined);
    const b = spawnRelay(tree, url, group);
    await until("a few deliveries", () => hook.arrivals.length > 200);
    const first = (await lockHolder(sql, group, group))!;
    await sql`SELECT pg_terminate_backend(${first})`;
    await until("another lock session", async () => ((await lockHolder(sql, group, group)) ?? first) !== first);
    await Bun.sleep(3_000); // let the stream run on, so that a relay still delivering shows its duplicates
    stop = true;
    await publisher;
    await until("everything delivered", async () => {
      const [{ lag }] = await sql`SELECT lag FROM tide.consumer_lag WHERE group_name = ${group} AND relay_group_id = ${group}`;
      return lag === 0n;
    });
    const keys = hook.arrivals.map((x) => `${x.id}`);
    const duplicates = keys.length - new Set(keys).size;
    const sent = performance.now();
    a.child.kill("SIGTERM");
    await a.child.exited;
    const sigtermMs = performance.now() - sent;
    b.child.kill("SIGKILL");
    await b.child.exited;
    return { duplicates, sigtermMs };
  } finally {
    stop = true;
    a.child.kill("SIGKILL");
    await sql.end();
    hook.stop();
  }
}

async function main() {
  const trees: Tree[] = [{ label: "this checkout", dir: HERE }];
  if (BASELINE) trees.push({ label: process.env.BASELINE_LABEL ?? "baseline", dir: BASELINE });
  console.log(await describeMachine());
  const pg = await startRestartablePostgres();
  // Each tree installs its own schema (an older relay refuses a newer schema) in a database of its own.
  const urls = new Map<string, string>();
  for (const [i, tree] of trees.entries()) {
    const admin = connect(pg.url, { max: 1 });
    await admin.unsafe(`CREATE DATABASE tide_recovery_${i}`);
    await admin.end();
    const url = withDatabase(pg.url, `tide_recovery_${i}`);
    const install = Bun.spawnSync([process.execPath, "main.ts", "install", "--postgres-url", url], { cwd: tree.dir });
    if (install.exitCode !== 0) throw new Error(`${tree.label}: install failed: ${install.stderr.toString()}`);
    const setup = connect(url, { max: 1 });
    await setup`SELECT tide.outbox_create('bench')`;
    await setup.end();
    urls.set(tree.label, url);
  }
  const results = new Map<string, { short: number[]; long: number[]; duplicates: number[]; sigterm: number[] }>();
  try {
    for (let run = 1; run <= RUNS; run++) {
      for (const tree of trees) {
        const r = results.get(tree.label) ?? { short: [], long: [], duplicates: [], sigterm: [] };
        results.set(tree.label, r);
        const url = urls.get(tree.label)!;
        r.short.push(await resumeAfterOutage(tree, pg, url, 0));
        r.long.push(await resumeAfterOutage(tree, pg, url, DOWN_SECONDS * 1000));
        const loss = await lockLoss(tree, url);
        r.duplicates.push(loss.duplicates);
        r.sigterm.push(loss.sigtermMs);
        console.log(`run ${run} ${tree.label}: resume ${fixed(r.short.at(-1)!, 0)} ms (restart), ${fixed(r.long.at(-1)!, 0)} ms (${DOWN_SECONDS} s down); ` +
          `lock loss: ${loss.duplicates} duplicates, SIGTERM ${fixed(loss.sigtermMs, 0)} ms`);
      }
    }
  } finally {
    await pg.destroy();
  }
  const cell = (values: number[]) => {
    const s = summarize(values);
    return `${fixed(s.p50, 0)} (${fixed(Math.min(...values), 0)}-${fixed(s.max, 0)})`;
  };
  console.log(markdownTable(
    ["relay", "resume after a restart, ms", `resume after ${DOWN_SECONDS} s down, ms`, "duplicates after lock-session loss", "SIGTERM after it, ms"],
    [...results].map(([label, r]) => [label, cell(r.short), cell(r.long), cell(r.duplicates), cell(r.sigterm)]),
  ));
}

await main();
