// Chaos for the fencing invariant ("only the current owner moves a position"): three relays share
// four webhook pipelines while publishers write concurrently, some in transactions that commit late
// with lower ids, and a seeded driver keeps injecting faults: it SIGKILLs a relay, freezes one with
// SIGSTOP past its ownership lease and resumes it (a zombie owner), terminates a relay's lock session
// with pg_terminate_backend, and restarts PostgreSQL once. At the end the webhook's record is checked
// against the outbox: every committed message arrived, none that was not committed did, each key's
// first arrivals are in publish order (duplicates allowed and counted), and the lag is 0.
//
// TIDE_CHAOS_SECONDS sets how long faults are injected (default 60; `npm run chaos`: 600), and
// TIDE_CHAOS_SEED repeats a run's choices (the seed is printed; timing still varies).

import { afterAll, describe, expect, it } from "bun:test";
import { connect, type Sql } from "../../core/db.ts";
import { installSchema } from "../../core/schema.ts";
import {
  committedMessages, lagOf, lockHolders, pipelinesOwnedBy, Random, recordingWebhook, RelayProcess,
  startRestartablePostgres, verifyDelivery, type RestartablePostgres,
} from "../support/chaos.ts";
import { withDatabase } from "../support/postgres.ts";
import { waitFor } from "../support/relay.ts";

const SECONDS = positive("TIDE_CHAOS_SECONDS", 60);
const SEED = positive("TIDE_CHAOS_SEED", Math.floor(Math.random() * 2 ** 31));
const RELAYS = 3;
const PIPELINES = 4;
const PUBLISHERS = 6;
/** Keys per publisher; each key lives in one outbox, so several publishers write to every outbox. */
const KEYS = 3;
const BATCH = 20;
const LEASE_MS = 2_000;
const GROUP = "chaos";
/** Generous: a slow shared machine, and a backlog built up while faults were injected. */
const SETTLE_MS = 300_000;

const outboxes = Array.from({ length: PIPELINES }, (_, i) => `chaos-${i}`);

let pg: RestartablePostgres | undefined;
let sql: Sql | undefined;
const everyRelay: RelayProcess[] = [];
/** Relays this test killed on purpose; any other exit is a relay that died by itself. */
const killed = new Set<RelayProcess>();
const stopPublishing = new AbortController();
const sink = recordingWebhook({ delayMs: sinkDelay(new Random(SEED + 1)) });

afterAll(async () => {
  stopPublishing.abort();
  await Promise.all(everyRelay.map((relay) => relay.kill()));
  sink.stop();
  await sql?.end({ timeout: 5 }).catch(() => {});
  await pg?.destroy();
});

describe("fencing under chaos", () => {
  it(
    "delivers every committed message in per-key order through kills, frozen owners, lost lock sessions and a PostgreSQL restart",
    async () => {
      console.log(`chaos: seed ${SEED} (TIDE_CHAOS_SEED=${SEED} repeats the choices), ${SECONDS} s of faults`);
      const rng = new Random(SEED);
      pg = await startRestartablePostgres();
      const { relayUrl, ownerUrl } = await prepareDatabase(pg);
      sql = connect(ownerUrl, { max: 4 });
      const admin = sql;

      const slots: { relay: RelayProcess }[] = [];
      const spawn = () => {
        const relay = new RelayProcess(relayUrl, [
          "--relay-group-id", GROUP,
          "--ownership-lease-ms", String(LEASE_MS),
          "--reconcile-interval-ms", "500",
          "--drain-timeout", "2",
          "--max-pipelines", "2", // spreads the four pipelines over at least two relays
        ]);
        everyRelay.push(relay);
        return relay;
      };
      for (let i = 0; i < RELAYS; i++) slots.push({ relay: spawn() });
      await Promise.all(slots.map((slot) => slot.relay.started()));
      await everyPipelineOwned(admin, "all pipelines to have an owner");

      const stats = { lateTransactions: 0, publishErrors: 0 };
      const publishers = Array.from({ length: PUBLISHERS }, (_, i) =>
        publisher(ownerUrl, i, new Random(SEED + 100 + i), stopPublishing.signal, stats));

      const faults = { kill: 0, freeze: 0, terminate: 0, "pg-restart": 0 };
      const started = Date.now();
      const elapsed = () => `${((Date.now() - started) / 1000).toFixed(1)}s`;
      const note = (text: string) => console.log(`chaos: ${elapsed()} ${text}`);
      const restartAt = started + SECONDS * 1000 * (0.3 + 0.3 * rng.next());
      let pgRestarted = false;
      const scrapeAll = () => Promise.all(slots.map((slot) => slot.relay.scrapeStaleAcks()));

      while (Date.now() - started < SECONDS * 1000) {
        await Bun.sleep(rng.int(1_000, 4_000)); // normal operation between faults
        await scrapeAll();
        if (!pgRestarted && Date.now() >= restartAt) {
          pgRestarted = true;
          faults["pg-restart"] += 1;
          note("restarting PostgreSQL");
          await pg.stop();
          await Bun.sleep(rng.int(500, 3_000)); // down for a while
          await pg.start();
          await everyPipelineOwned(admin, "every pipeline to be owned again after the PostgreSQL restart", 120_000);
          continue;
        }
        const fault = rng.pick(["kill", "freeze", "terminate"] as const);
        if (fault === "kill") {
          const slot = rng.pick(slots);
          note(`SIGKILL relay ${slot.relay.pid}`);
          killed.add(slot.relay);
          await slot.relay.kill();
          faults.kill += 1;
          await Bun.sleep(rng.int(200, 2_000)); // a supervisor restarts it a little later
          slot.relay = spawn();
          await slot.relay.started();
        } else if (fault === "freeze") {
          const owners = [];
          for (const slot of slots) {
            const owned = await pipelinesOwnedBy(admin, GROUP, slot.relay.pid);
            if (owned.length > 0) owners.push({ slot, owned });
          }
          if (owners.length === 0) continue;
          const { slot, owned } = rng.pick(owners);
          note(`SIGSTOP relay ${slot.relay.pid} (owns ${owned.join(", ")}) past its ${LEASE_MS} ms lease`);
          slot.relay.freeze();
          faults.freeze += 1;
          await waitFor(`the pipelines of frozen relay ${slot.relay.pid} to be taken over`, async () => {
            const holders = await lockHolders(admin, GROUP, owned);
            const still = await pipelinesOwnedBy(admin, GROUP, slot.relay.pid);
            return owned.every((p) => holders.has(p)) && still.length === 0;
          }, 60_000);
          await Bun.sleep(rng.int(0, 1_500)); // the new owner delivers for a while
          note(`SIGCONT relay ${slot.relay.pid}`);
          slot.relay.resume();
        } else {
          const pipeline = rng.pick(outboxes);
          const holder = (await lockHolders(admin, GROUP, [pipeline])).get(pipeline)?.[0];
          if (holder === undefined) continue;
          note(`pg_terminate_backend(${holder}): the lock session owning ${pipeline}`);
          await admin`SELECT pg_terminate_backend(${holder})`;
          faults.terminate += 1;
          await waitFor(`${pipeline} to be owned again after its lock session ended`, async () =>
            (await lockHolders(admin, GROUP, [pipeline])).has(pipeline), 60_000);
        }
      }

      note("faults over: stopping the publishers and waiting for the relays to catch up");
      stopPublishing.abort();
      await Promise.all(publishers);
      let progress = "";
      await waitFor("every committed message to arrive and the lag to be 0", async () => {
        const sent = await committedMessages(admin, outboxes);
        const arrived = sink.distinct();
        const { groups, lag } = await lagOf(admin, GROUP, outboxes);
        const delivered = sent.filter((m) => arrived.has(`${m.outbox}:${m.id}`)).length;
        progress = `${delivered}/${sent.length} delivered, lag ${lag} over ${groups} groups`;
        return groups === PIPELINES && lag === 0n && delivered === sent.length;
      }, SETTLE_MS).catch((error) => {
        throw new Error(`${(error as Error).message} (${progress})`);
      });

      await scrapeAll();
      const verdict = verifyDelivery(await committedMessages(admin, outboxes), sink.arrivals);
      const staleMetric = everyRelay.reduce((sum, relay) => sum + relay.staleAcksSeen, 0);
      const staleLogged = everyRelay.reduce((sum, relay) => sum + relay.logged("stale acknowledgement").length, 0);
      const faultText = Object.entries(faults).map(([kind, n]) => `${kind} ${n}`).join(", ");
      console.log(
        `chaos summary: seed ${SEED}, ${SECONDS} s: sent ${verdict.sent}, delivered ${verdict.delivered}, ` +
          `duplicates ${verdict.duplicates}, stale acks refused ${staleMetric} (metric) / ${staleLogged} (logged), ` +
          `faults: ${faultText}; late-commit transactions ${stats.lateTransactions}, publish errors ${stats.publishErrors}`,
      );

      expect(verdict.sent).toBeGreaterThan(0);
      expect(verdict.missing.slice(0, 20)).toEqual([]);
      expect(verdict.unknown.slice(0, 20)).toEqual([]);
      expect(verdict.altered.slice(0, 20)).toEqual([]);
      expect(verdict.outOfOrder.slice(0, 20)).toEqual([]);
      expect((await lagOf(admin, GROUP, outboxes)).lag).toBe(0n);
      // Relays reconnect by themselves: none ended except those the driver killed.
      const died = everyRelay.filter((relay) => relay.exitCode !== null && !killed.has(relay));
      expect(died.map((relay) => `relay ${relay.pid} exited with ${relay.exitCode}:\n${relay.tail()}`)).toEqual([]);
    },
    SECONDS * 1000 + SETTLE_MS + 180_000,
  );
});

/**
 * A database with the schema and the four pipelines; the relays log in as a role that holds only
 * tide_relay, as in production. Returns the relays' URL and the superuser's.
 */
async function prepareDatabase(server: RestartablePostgres): Promise<{ relayUrl: string; ownerUrl: string }> {
  const bootstrap = connect(server.url, { max: 1 });
  await bootstrap`CREATE DATABASE tide_chaos`;
  await bootstrap.end();
  const ownerUrl = withDatabase(server.url, "tide_chaos");
  const owner = connect(ownerUrl, { max: 1 });
  try {
    await installSchema(owner);
    const role = `chaos_relay_${Math.random().toString(36).slice(2, 10)}`;
    await owner.unsafe(`CREATE ROLE ${role} LOGIN PASSWORD 'chaos' IN ROLE tide_relay`);
    for (const name of outboxes) {
      await owner`SELECT tide.outbox_create(${name})`;
      await owner`SELECT tide.relay_set_outbox(${name}, ${name}, 'webhook',
        ${owner.json({ url: sink.url, timeout_ms: 10_000, retry: { initial_backoff_ms: 50, max_backoff_ms: 1_000 } })},
        p_batch_size := ${BATCH})`;
    }
    const relayUrl = new URL(ownerUrl);
    relayUrl.username = role;
    relayUrl.password = "chaos";
    return { relayUrl: relayUrl.toString(), ownerUrl };
  } finally {
    await owner.end();
  }
}

/**
 * One publisher: messages of its own keys, one at a time, each committed before the next (so a
 * key's publish order is its commit order). A quarter are transactions of 1-3 messages held open
 * while the others commit: their lower ids commit late. A failed publish (PostgreSQL restarting)
 * is not retried; whether it committed is read from the outbox at the end.
 */
async function publisher(
  url: string,
  index: number,
  rng: Random,
  stop: AbortSignal,
  stats: { lateTransactions: number; publishErrors: number },
): Promise<void> {
  const db = connect(url, { max: 1 });
  let seq = 0;
  const next = () => {
    const k = rng.int(0, KEYS - 1);
    return { outbox: outboxes[(index + k) % PIPELINES]!, payload: { key: `p${index}-k${k}`, seq: ++seq } };
  };
  try {
    while (!stop.aborted) {
      try {
        if (rng.next() < 0.25) {
          const count = rng.int(1, 3);
          const holdMs = rng.int(50, 800);
          await db.begin(async (tx) => {
            for (let i = 0; i < count; i++) {
              const { outbox, payload } = next();
              await tx`SELECT tide.outbox_publish(${outbox}, ${db.json(payload)})`;
            }
            await Bun.sleep(holdMs); // held open while the other publishers commit
          });
          stats.lateTransactions += 1;
        } else {
          const { outbox, payload } = next();
          await db`SELECT tide.outbox_publish(${outbox}, ${db.json(payload)})`;
        }
      } catch {
        stats.publishErrors += 1;
        await Bun.sleep(200);
      }
      await Bun.sleep(rng.int(20, 120)); // a steady trickle, not a flood: the point is the faults
    }
  } finally {
    await db.end({ timeout: 5 }).catch(() => {});
  }
}

/** Mostly at once, now and then slowly: a slow answer widens the window in which a fault hits a batch. */
function sinkDelay(rng: Random): () => number {
  return () => (rng.next() < 0.02 ? rng.int(50, 300) : 0);
}

async function everyPipelineOwned(admin: Sql, what: string, timeoutMs = 60_000): Promise<void> {
  await waitFor(what, async () => {
    const holders = await lockHolders(admin, GROUP, outboxes);
    return outboxes.every((name) => holders.get(name)?.length === 1);
  }, timeoutMs);
}

function positive(name: string, fallback: number): number {
  const text = process.env[name];
  if (text === undefined || text === "") return fallback;
  const value = Number(text);
  if (!Number.isInteger(value) || value <= 0) throw new Error(`${name} must be a positive integer (got "${text}")`);
  return value;
}
