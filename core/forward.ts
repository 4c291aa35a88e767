// One forward pipeline: read the next batch of its consumer group, filter, hand it to the sink,
// retry what failed, dead-letter what cannot be delivered, and only then move the position.
// The position moves after the sink acknowledged, so a crash re-delivers at most one batch.
//
// While the sink publishes a full batch, the next one is read ahead, from the position this one's
// acknowledgement will leave (tide.consumer_read_ahead, read-only), and used only once this one is
// acknowledged in full. Otherwise the acknowledgement reads the next batch in the same round trip
// (tide.consumer_commit_read). A worker with nothing to read waits for the relay's shared probe (or
// a NOTIFY) to say there is something, rather than polling its outbox by itself.
//
// Every batch carries the fence it was read under (interval, cursor, rewind generation) and its
// acknowledgement is a compare-and-set on them (tide.consumer_commit): an acknowledgement that
// arrives late, from a relay that lost its lock or a process that was paused, is refused instead of
// moving the position over messages nobody delivered. A worker never acknowledges once it was fenced
// or aborted.

import type { Sql } from "./db.ts";
import type { IdleProbe } from "./idle_probe.ts";
import { backoffDelay, sleep, TIMED_OUT, Wakeup, within, type BackoffPolicy } from "./backoff.ts";
import { failpoint, failpointEnabled, type FailpointName } from "./failpoints.ts";
import { handled } from "./runtime.ts";
import { ConfigError } from "./errors.ts";
import type { FilterFn } from "./filter.ts";
import type { Formatter } from "./wire_format.ts";
import type { RelayEvents } from "./events.ts";
import { WorkerStatus } from "./worker_status.ts";
import type { Logger } from "./log.ts";
import type { OutboxMessage, SinkInstance } from "./plugin.ts";
import { preparePipeline } from "./pipeline_config.ts";
import { redactText } from "./redact.ts";
import { pluginContext, type PluginRegistry } from "./plugins.ts";
import { parseJson } from "./json.ts";
import { outboxMessage } from "./message.ts";
import { DEFAULT_LANE_KEY, laneCount, laneGroup, laneKeyText, laneOf, ownershipUnit, type LaneKey } from "./lanes.ts";

export interface PipelineRow {
  name: string;
  direction: "forward" | "reverse";
  outbox_name: string | null;
  consumer_group: string | null;
  inbox_name: string | null;
  plugin_type: string;
  config: Record<string, any>;
  batch_size: number;
  enabled: boolean;
  idempotent: boolean;
  /** Bumped by every catalog change to the row; the owner records the version it runs. */
  config_version: bigint;
  updated_at: Date;
}

export { WorkerStatus } from "./worker_status.ts";

export interface ForwardOptions {
  sql: Sql;
  postgresUrl?: string;
  registry: PluginRegistry;
  logger: Logger;
  relayGroupId: string;
  pollIntervalMs: number;
  events?: RelayEvents;
  /** Called when an acknowledgement was refused as stale or the database failed a read (the coordinator re-checks ownership). */
  doubtOwnership?: () => void;
  /** Checks for waiting pipelines whether they have something to read; without it, a waiting worker polls. */
  probe?: IdleProbe;
  /** The lane this worker delivers (0..lanes-1; config `lanes`): it reads the lane's consumer group. */
  lane?: number;
}

/** Retrying a failed read or acknowledgement: the database is back within a second of its return. */
export const DATABASE_RETRY: BackoffPolicy = { initialMs: 100, maxMs: 1_000 };

/** What a batch was read under: tide.consumer_commit refuses an acknowledgement when any has moved. */
interface Fence {
  /** consumer_groups.owner_epoch this worker claimed when it took the pipeline over. */
  ownerEpoch: bigint;
  intervalSeq: bigint;
  readCursor: bigint;
  generation: bigint;
}

/** A batch as read, with its fence. */
interface Batch {
  messages: OutboxMessage[];
  fence: Fence;
}

/** 0: retry a transiently failing message until it is delivered (webhooks: "until 2xx"). */
export const DEFAULT_MAX_ATTEMPTS = 0;

/**
 * How long a worker that the probe watches waits before reading by itself anyway: a safety net, not
 * the way it learns of new messages (the probe, or a NOTIFY, wakes it at once).
 */
const PROBED_WAIT_MS = 60_000;

export class ForwardWorker {
  readonly status: WorkerStatus;
  readonly #row: PipelineRow;
  readonly #options: ForwardOptions;
  readonly #log: Logger;
  readonly #wakeup = new Wakeup();
  /** Stops the loop between batches: in-flight deliveries finish (drain). */
  readonly #stopping = new AbortController();
  /** Aborts the sink itself: only when draining took too long. */
  readonly #abort = new AbortController();
  #sink: SinkInstance | undefined;
  #filter: FilterFn | undefined;
  #format: Formatter | undefined;
  #loop: Promise<void> | undefined;
  #retry: BackoffPolicy & { maxAttempts: number };
  #pauseOnFailure: boolean;
  #fence: Fence | undefined;
  #ownerEpoch: bigint | undefined;
  /** Set when ownership is in doubt: nothing is acknowledged any more. */
  #fenced = false;
  #databaseFailures = 0;
  #redeliverDeadLetters = true;
  /** When this worker last read a batch (Date.now()): the probe checks a recently busy pipeline often. */
  #busyAt = 0;
  /** What the last acknowledgement read after it (consumer_commit_read): a batch, null for nothing. */
  #readWithAck: Batch | null | undefined;
  /** How many messages the next read asks for: batch_size, grown while a backlog lasts (#nextLimit). */
  #limit: number;
  /** The most #limit grows to: max_batch_size, or batch_size when the sink does not grow batches. */
  #maxLimit: number;
  /** This worker's lane, of #lanes; it delivers only the messages whose key hashes to it. */
  readonly lane: number;
  readonly lanes: number;
  /** The pipeline's own consumer group (lane 0's), from whose position the other lanes start. */
  readonly #baseGroup: string;
  #laneKey: LaneKey = { root: "headers", path: ["key"], text: DEFAULT_LANE_KEY };
  /** isolate_poison: a failing message and its key's later messages are parked (tide.relay_held). */
  #isolate = false;
  /** Keys with parked messages (loaded at takeover): a message of one is parked behind them. */
  #heldKeys: Set<string> | undefined;
  /** When the oldest parked message of some key is due for its next attempt (Date.now()). */
  #heldDueAt = Infinity;

  constructor(row: PipelineRow, options: ForwardOptions) {
    this.lanes = laneCount(row.config);
    this.lane = options.lane ?? 0;
    this.#baseGroup = row.consumer_group!;
    // A lane reads its own group: every read, acknowledgement and probe below goes to it.
    this.#row = this.lanes > 1 ? { ...row, consumer_group: laneGroup(row.consumer_group!, this.lane, this.lanes) } : row;
    this.#options = options;
    this.#log = options.logger.child(this.lanes > 1 ? { pipeline: row.name, lane: this.lane } : { pipeline: row.name });
    this.status = new WorkerStatus(row.name, "forward", this.#log, options.events);
    const retry = row.config.retry ?? {};
    this.#retry = {
      initialMs: retry.initial_backoff_ms ?? 200,
      maxMs: retry.max_backoff_ms ?? 30_000,
      maxAttempts: retry.max_attempts ?? DEFAULT_MAX_ATTEMPTS,
    };
    this.#pauseOnFailure = row.config.on_failure === "pause";
    this.#limit = this.#maxLimit = row.batch_size;
  }

  get name(): string {
    return this.#row.name;
  }

  get outbox(): string {
    return this.#row.outbox_name!;
  }

  /** The unit of ownership this worker is: the pipeline, or one lane of it (`<pipeline>#<lane>`). */
  get unit(): string {
    return ownershipUnit(this.#row.name, this.lane, this.lanes);
  }

  get updatedAt(): number {
    return new Date(this.#row.updated_at).getTime();
  }

  /** Validates and builds the sink (no I/O), then starts the delivery loop. */
  async start(): Promise<void> {
    const prepared = await preparePipeline(this.#row, this.#options.registry);
    this.#filter = prepared.filter;
    this.#format = prepared.format;
    if (prepared.lanes) this.#laneKey = prepared.lanes.key;
    this.#isolate = prepared.isolatePoison === true;
    const ctx = {
      ...pluginContext(this.#row.name, this.#log, this.#abort.signal, this.#row.batch_size, this.#options.postgresUrl),
      relayGroupId: this.#options.relayGroupId,
      failpoint: (name: string) => failpoint(name as FailpointName),
    };
    if (prepared.definition.kind !== "sink") throw new ConfigError(`pipeline "${this.#row.name}": not a sink`);
    const { batch_size: batchSize, config } = this.#row;
    const max: number = config.max_batch_size ?? (prepared.definition.growBatches ? Math.max(batchSize, GROWN_BATCH_SIZE) : batchSize);
    if (max < batchSize) {
      throw new ConfigError(`pipeline "${this.#row.name}": 'max_batch_size' (${max}) is below its batch_size (${batchSize}); ` +
        `raise it, or leave it out to read batch_size messages at a time`);
    }
    this.#maxLimit = max;
    this.#sink = prepared.definition.create(prepared.pluginConfig, ctx);
    this.#loop = this.#run();
  }

  /** Ownership is in doubt: abort the sink and the loop at once; nothing is acknowledged after this. */
  fence(): void {
    this.#fenced = true;
    this.#stopping.abort();
    this.#abort.abort();
  }

  /** New messages may be there: end the idle wait now. */
  wake(): void {
    this.#wakeup.set();
  }

  /** Dead letters were requeued: deliver them on the next turn. */
  requeue(): void {
    this.#redeliverDeadLetters = true;
    this.#wakeup.set();
  }

  /**
   * Finishes the in-flight batch (up to drainMs), then closes the sink. A sink that ignores the
   * abort at drainMs is left behind ABANDON_MS later: its batch stays unacknowledged, so the next
   * owner delivers it again, and stopping never hangs on a sink.
   */
  async stop(drainMs = 10_000): Promise<void> {
    this.#stopping.abort();
    const timer = setTimeout(() => this.#abort.abort(), drainMs);
    try {
      if ((await within(this.#loop ?? Promise.resolve(), drainMs + ABANDON_MS)) === TIMED_OUT) {
        this.#log.warn("the sink did not stop when aborted; its batch is left unacknowledged", { abandoned_after_ms: drainMs + ABANDON_MS });
      }
    } finally {
      clearTimeout(timer);
      this.#abort.abort();
      const closing = this.#sink?.close().catch((error) => this.#log.warn("closing the sink failed", { error }));
      if (closing && (await within(closing, ABANDON_MS)) === TIMED_OUT) this.#log.warn("closing the sink did not finish; left behind");
    }
  }

  async #run(): Promise<void> {
    const stop = this.#stopping.signal;
    await this.#connect();
    // The batch after the one just acknowledged, read while that one was being delivered or with its
    // acknowledgement; null when that read found nothing, undefined when there was none.
    let ahead: Promise<Batch | null | undefined> | undefined;
    while (!stop.aborted) {
      try {
        if (this.#redeliverDeadLetters) {
          this.#redeliverDeadLetters = false;
          await this.#redeliverRequeued().catch((error) => {
            this.#redeliverDeadLetters = true; // try again on the next turn
            throw error;
          });
        }
        const { relayGroupId } = this.#options;
        const { outbox_name: outbox, consumer_group: group } = this.#row;
        if (this.#ownerEpoch === undefined) {
          // The lanes' groups start together from lane 0's position (refused when the pipeline ran
          // with another number of lanes), then taking the lane over: from now on a former owner's
          // acknowledgements are refused.
          await this.#ensureLanes();
          const [{ epoch }] = await this.#options.sql<{ epoch: bigint }[]>`
            SELECT tide.consumer_claim(${outbox}, ${group}, ${relayGroupId}) AS epoch`;
          this.#ownerEpoch = epoch;
        }
        if (this.#isolate && (this.#heldKeys === undefined || Date.now() >= this.#heldDueAt)) await this.#retryHeld();
        const readBefore = await ahead;
        ahead = undefined;
        const batch = readBefore !== undefined ? readBefore : this.#batchOf(await this.#options.sql<FencedRow[]>`
          SELECT id, outbox, topic, payload::text AS payload, headers::text AS headers, created_at, interval_seq, read_cursor, generation
            FROM tide.consumer_read_batch(${outbox}, ${group}, ${this.#limit}, ${relayGroupId}, p_durable := false)`);
        this.#databaseFailures = 0;
        if (!batch) {
          await this.#idle();
          continue;
        }
        this.#busyAt = Date.now();
        this.#fence = batch.fence;
        await failpoint("forward.after-read");
        // A full batch may have a next one in the same interval: read it (a larger one while a
        // backlog lasts) while the sink publishes. Otherwise the acknowledgement reads the next batch.
        const full = batch.messages.length >= this.#limit;
        this.#limit = this.#nextLimit(batch.messages, full);
        const next = full ? this.#readAhead(batch) : undefined;
        this.#readWithAck = undefined;
        // Not delivered (stopping, paused or refused): the batch stays unacknowledged, and the batch
        // read ahead of it, fenced on its acknowledgement, is dropped.
        if (await this.#deliver(batch.messages, next === undefined)) ahead = next ?? Promise.resolve(this.#readWithAck);
      } catch (error) {
        if (stop.aborted) break;
        if (error instanceof LanesRefused) {
          this.status.fail(error, "the pipeline cannot start its lanes");
          await sleep(this.status.retryDelay(this.#retry), stop);
          continue;
        }
        // The database, not the sink: retry fast, so delivery resumes right after it is back. A
        // restarted server also ended the lock session: have ownership checked now.
        this.status.fail(error, "reading or acknowledging the outbox failed");
        this.#options.doubtOwnership?.();
        await sleep(backoffDelay(++this.#databaseFailures, DATABASE_RETRY), stop);
      }
    }
  }

  /**
   * The batch after `batch`, from the position its acknowledgement will leave, fenced on that
   * position; undefined when the interval ends with `batch` (or anything moved meanwhile), and when
   * the read fails: the loop then reads again after the acknowledgement.
   */
  async #readAhead(batch: Batch): Promise<Batch | undefined> {
    const { outbox_name: outbox, consumer_group: group } = this.#row;
    const limit = this.#limit;
    const { intervalSeq, generation } = batch.fence;
    const last = batch.messages[batch.messages.length - 1].id;
    try {
      return this.#batchOf(await this.#options.sql<FencedRow[]>`
        SELECT id, outbox, topic, payload::text AS payload, headers::text AS headers, created_at, interval_seq, read_cursor, generation
          FROM tide.consumer_read_ahead(${outbox}, ${group}, ${limit}, ${this.#options.relayGroupId}, ${intervalSeq}, ${generation}, ${last})`);
    } catch (error) {
      this.#log.debug("reading ahead failed; reading after the acknowledgement instead", { error });
      return undefined;
    }
  }

  /**
   * The read limit after `batch`: doubled after a full batch, up to #maxLimit and as long as the
   * next batch would stay under GROWN_BATCH_BYTES of payload; back to batch_size once a batch is
   * not full (the backlog is gone: small batches keep latency low).
   */
  #nextLimit(batch: OutboxMessage[], full: boolean): number {
    let bytes = 0;
    for (const message of batch) bytes += message.payloadText.length;
    handled(bytes);
    if (!full) return this.#row.batch_size;
    if (this.#limit >= this.#maxLimit) return this.#limit;
    return bytes * 2 <= GROWN_BATCH_BYTES ? Math.min(this.#limit * 2, this.#maxLimit) : this.#limit;
  }

  #batchOf(rows: FencedRow[]): Batch | undefined {
    if (rows.length === 0 || rows[0].id === null) return undefined;
    const { interval_seq: intervalSeq, read_cursor: readCursor, generation } = rows[0];
    return { messages: rows.map(toMessage), fence: { ownerEpoch: this.#ownerEpoch!, intervalSeq, readCursor, generation } };
  }

  /**
   * Nothing to read: wait until the relay's shared probe finds something for this pipeline (checked
   * every few milliseconds right after it was busy, then less and less often, up to its poll
   * interval), a NOTIFY wakes it, or it is stopped. Without a probe, poll at the poll interval.
   */
  async #idle(): Promise<void> {
    const pollMs = this.#row.config.poll_interval_ms ?? this.#options.pollIntervalMs;
    const probe = this.#options.probe;
    this.status.waiting = true;
    const unwatch = probe?.watch({
      outbox: this.#row.outbox_name!,
      group: this.#row.consumer_group!,
      pollMs,
      busyAt: this.#busyAt,
      wake: () => this.#wakeup.set(),
    });
    try {
      // Parked messages due for a retry end the wait too.
      const heldMs = Math.max(0, this.#heldDueAt - Date.now());
      await this.#wakeup.wait(Math.min(probe ? Math.max(pollMs, PROBED_WAIT_MS) : pollMs, heldMs), this.#stopping.signal);
    } finally {
      unwatch?.();
      this.status.waiting = false;
    }
  }

  async #connect(): Promise<void> {
    const stop = this.#stopping.signal;
    while (!stop.aborted) {
      try {
        await this.#sink!.connect();
        this.status.succeed();
        return;
      } catch (error) {
        this.status.fail(error, "connecting the sink failed");
        await sleep(this.status.retryDelay(this.#retry), stop);
      }
    }
  }

  /**
   * Delivers a batch with retries; true once it is acknowledged (position moved). With `readNext`,
   * the acknowledgement also reads the next batch (#readWithAck).
   */
  async #deliver(batch: OutboxMessage[], readNext = false): Promise<boolean> {
    const startedAt = Date.now();
    const stop = this.#stopping.signal;
    // Other lanes' messages are skipped like filtered ones: the position moves past them.
    const mine = this.lanes > 1 ? batch.filter((m) => laneOf(m, this.#laneKey, this.lanes) === this.lane) : batch;
    const { matching, undecided } = this.#filter ? this.#matches(mine) : { matching: mine, undecided: [] };
    const formatted = this.#format ? matching.map(this.#format) : matching;
    const attempts = new Map<bigint, number>();
    const dead: DeadLetter[] = [...undecided];
    // isolate_poison: messages of keys with parked messages are parked behind them, unsent.
    const keys = this.#isolate ? new Map(matching.map((m) => [m.id, laneKeyText(m, this.#laneKey) ?? ""])) : undefined;
    const parked: Parked[] = [];
    let passing = formatted;
    if (keys && this.#heldKeys?.size) {
      passing = [];
      for (const message of formatted) {
        const key = keys.get(message.id)!;
        if (this.#heldKeys.has(key)) parked.push({ message, key, error: null, attempts: 0 });
        else passing.push(message);
      }
    }
    let pending = passing;
    while (pending.length > 0) {
      let failures;
      try {
        failures = await this.#publish(pending);
      } catch (error) {
        // The whole batch failed (target down): keep it in the outbox and retry without a budget.
        this.status.fail(error, "delivery failed", { batch: pending.length });
        if (stop.aborted) return false;
        await sleep(this.status.retryDelay(this.#retry), stop);
        if (stop.aborted) return false;
        continue;
      }
      if (this.#abort.signal.aborted) return false; // cut off: the batch stays unacknowledged
      const failed = new Map(failures.map((f) => [f.id, f]));
      // An outage, not a bad message: every message tried failed, none went through, and each may
      // succeed later (connection errors, 5xx, timeouts). It is retried like a thrown error, without
      // spending anyone's attempts. A message spends its attempts only when it fails while others in
      // the same call succeed, when the target refused it (DeliveryFailure.refused), or when its
      // failure is permanent.
      const tried = pending.filter((m) => !failed.get(m.id)?.heldBack);
      const outage = tried.length > 0 && tried.every((m) => failed.get(m.id)?.retriable && !failed.get(m.id)?.refused);
      const retry: OutboxMessage[] = [];
      for (const message of pending) {
        const failure = failed.get(message.id);
        if (!failure) continue;
        if (failure.heldBack || (outage && failure.retriable)) {
          retry.push(message); // not tried, or tried during an outage: no attempt spent
          continue;
        }
        const count = (attempts.get(message.id) ?? 0) + 1;
        attempts.set(message.id, count);
        const budgetSpent = this.#retry.maxAttempts > 0 && count >= this.#retry.maxAttempts;
        if (!failure.retriable || budgetSpent) {
          dead.push({ message, error: failure.error.message, attempts: count });
        } else if (keys) {
          // A message of its own that keeps failing: parked, with its key's later messages below.
          parked.push({ message, key: keys.get(message.id)!, error: failure.error.message, attempts: count });
        } else {
          retry.push(message);
        }
      }
      if (keys && parked.length > 0) {
        const parkedKeys = new Set(parked.map((p) => p.key));
        for (const message of retry.splice(0)) {
          if (parkedKeys.has(keys.get(message.id)!)) parked.push({ message, key: keys.get(message.id)!, error: null, attempts: 0 });
          else retry.push(message);
        }
      }
      if (dead.length > 0 && this.#pauseOnFailure) {
        // The position stops right before the message: everything earlier in the batch is
        // acknowledged, and the pipeline waits for its config to change (or to be stopped).
        // Messages still waiting for a retry are not delivered either: the position stops before
        // the first of them too.
        const blocked = [...dead.map((d) => d.message.id), ...retry.map((m) => m.id)]
          .reduce((low, id) => (id < low ? id : low));
        const before = batch.filter((m) => m.id < blocked);
        if (before.length > 0 && !(await this.#acknowledge(before, []))) return false;
        this.status.fail(new Error(dead[0].error), "paused: a message cannot be delivered (on_failure = pause)", { id: String(blocked) });
        await new Promise<void>((resolve) => stop.addEventListener("abort", () => resolve(), { once: true }));
        return false;
      }
      pending = retry;
      if (pending.length > 0) {
        const what = outage ? "delivery failed; the target looks down, retrying without spending attempts" : "some messages failed; retrying them";
        this.status.fail(failures[0].error, what, { failed: pending.length });
        await sleep(this.status.retryDelay(this.#retry), stop);
        if (stop.aborted) return false;
      }
    }
    if (!(await this.#acknowledge(batch, dead, readNext, parked))) return false;
    // Dead letters the filter could not decide on were never passing: they are not "filtered" either.
    const filtered = mine.length - formatted.length - undecided.length;
    const notDelivered = new Set([...dead.map((d) => d.message.id), ...parked.map((p) => p.message.id)]);
    const delivered = notDelivered.size ? passing.filter((m) => !notDelivered.has(m.id)) : passing;
    this.status.delivered += delivered.length;
    this.status.filtered += filtered;
    this.status.succeed();
    this.#options.events?.delivered?.(this.#row.name, delivered, startedAt);
    if (filtered > 0) this.#options.events?.filtered?.(this.#row.name, filtered);
    return true;
  }

  /**
   * Sink failures for a batch. With the forward.after-partial-publish failpoint set, the batch goes
   * out in two halves with the failpoint between them (a crash after the sink took part of it).
   */
  async #publish(pending: OutboxMessage[]) {
    if (!failpointEnabled("forward.after-partial-publish") || pending.length < 2) {
      const failures = await this.#sink!.publish(pending);
      await failpoint("forward.after-publish");
      return failures;
    }
    const half = Math.ceil(pending.length / 2);
    const first = await this.#sink!.publish(pending.slice(0, half));
    await failpoint("forward.after-partial-publish");
    const second = await this.#sink!.publish(pending.slice(half));
    await failpoint("forward.after-publish");
    return [...first, ...second];
  }

  /**
   * Dead-letters `dead` and moves the position past `batch` in one transaction, unless the worker
   * was fenced or aborted, or the commit is refused as stale. True when the position moved. With
   * `readNext` and no dead letters, the same round trip reads the next batch into #readWithAck.
   */
  async #acknowledge(batch: OutboxMessage[], dead: DeadLetter[], readNext = false, parked: Parked[] = []): Promise<boolean> {
    if (this.#fenced || this.#abort.signal.aborted) return false;
    const last = batch[batch.length - 1].id;
    const fence = this.#fence!;
    await failpoint("forward.before-commit");
    if (this.#fenced || this.#abort.signal.aborted) return false;
    // p_durable := false: the commit does not wait for a disk flush; only a crash of the server can
    // then take the position back a little, and what it covered is delivered again (sql/002).
    const commit = (sql: Sql) => sql<{ moved: boolean }[]>`
      SELECT tide.consumer_commit(${this.#row.outbox_name}, ${this.#row.consumer_group}, ${last}, ${batch.length},
                                  ${this.#options.relayGroupId}, ${fence.generation}, ${fence.intervalSeq},
                                  ${fence.readCursor}, ${fence.ownerEpoch}, p_durable := false) AS moved`;
    // Without dead letters the commit is one statement, one round trip (reading the next batch too
    // when asked); with them, one transaction.
    const moved = dead.length > 0 || parked.length > 0 ? await this.#commitWithDeadLetters(commit, dead, parked)
      : readNext ? await this.#commitAndRead(last, batch.length, fence)
      : (await commit(this.#options.sql))[0].moved;
    if (!moved) {
      this.#log.warn("stale acknowledgement refused: the position moved since this batch was read " +
        "(a rewind, or another relay delivered it); reading again from the current position", {
        last_id: String(last),
      });
      this.#options.events?.staleAck?.(this.#row.name);
      this.#options.doubtOwnership?.();
      return false;
    }
    await failpoint("forward.after-commit");
    if (parked.length > 0) {
      for (const { key } of parked) this.#heldKeys?.add(key);
      this.#heldDueAt = Math.min(this.#heldDueAt, Date.now() + backoffDelay(1, this.#retry));
      const keys = [...new Set(parked.filter((p) => p.error !== null).map((p) => p.key))];
      if (keys.length > 0) {
        this.#log.warn("messages that keep failing are parked with their key's later ones; other keys flow on", {
          keys: keys.length, parked: parked.length, first_error: parked.find((p) => p.error !== null)?.error,
        });
      }
    }
    if (dead.length > 0) {
      this.status.deadLettered += dead.length;
      this.#options.events?.deadLettered?.(this.#row.name, dead.length);
      this.#log.warn("messages moved to the dead-letter queue", { count: dead.length, first_error: dead[0].error });
    }
    return true;
  }

  /** The commit and the dead letters in one transaction: both are recorded, or neither. */
  #commitWithDeadLetters(commit: (sql: Sql) => Promise<{ moved: boolean }[]>, dead: DeadLetter[], parked: Parked[] = []): Promise<boolean> {
    return this.#options.sql.begin(async (tx) => {
      const [{ moved }] = await commit(tx as unknown as Sql);
      if (!moved) return false; // nothing of this batch is recorded: the dead letters neither
      if (this.#fenced || this.#abort.signal.aborted) throw new Fenced();
      for (const entry of dead) {
        // A target that echoes the request (headers included) would put credentials in the error.
        await tx`SELECT tide.relay_dlq_add(${this.#row.name}, ${entry.message.id}, ${redactText(entry.error)}, ${entry.attempts})`;
      }
      for (const entry of parked) {
        await tx`SELECT tide.relay_hold(${this.#row.name}, ${this.#options.relayGroupId}, ${this.lane}, ${entry.key}, ${entry.message.id},
                                        ${entry.error === null ? null : redactText(entry.error)}, ${entry.attempts})`;
      }
      return true;
    }).catch((error) => {
      if (error instanceof Fenced) return false;
      throw error;
    });
  }

  /** The commit, and when it moved the position, the read of the next batch: one round trip. */
  async #commitAndRead(last: bigint, count: number, fence: Fence): Promise<boolean> {
    const { outbox_name: outbox, consumer_group: group } = this.#row;
    const limit = this.#limit;
    const rows = await this.#options.sql<(FencedRow & { moved: boolean })[]>`
      SELECT moved, id, outbox, topic, payload::text AS payload, headers::text AS headers, created_at, interval_seq, read_cursor, generation
        FROM tide.consumer_commit_read(${outbox}, ${group}, ${last}, ${count}, ${this.#options.relayGroupId}, ${fence.generation},
                                       ${fence.intervalSeq}, ${fence.readCursor}, ${fence.ownerEpoch}, ${limit}, p_durable := false)`;
    if (!rows[0].moved) return false;
    this.#readWithAck = this.#batchOf(rows) ?? null;
    return true;
  }

  /**
   * Creates the lanes' consumer groups (all at once, at lane 0's position) when they do not exist yet.
   * A pipeline that ran with another number of lanes is refused with the reason (its last_error).
   */
  async #ensureLanes(): Promise<void> {
    try {
      await this.#options.sql`
        SELECT tide.consumer_lanes_ensure(${this.#row.outbox_name}, ${this.#baseGroup}, ${this.lanes}, ${this.#options.relayGroupId})`;
    } catch (error) {
      const { code, message, hint } = error as { code?: string; message: string; hint?: string };
      if (code !== "55000") throw error;
      throw new LanesRefused(`pipeline "${this.#row.name}": ${message}${hint ? `; ${hint}` : ""}`);
    }
  }

  /**
   * isolate_poison: retries the oldest parked message of every key that is due, one key at a time
   * in message order; a key whose message went through (or was dead-lettered after
   * retry.max_attempts) goes on with its next one at once, and is released once none is left. Then
   * reloads which keys are parked and when the next retry is due.
   */
  async #retryHeld(): Promise<void> {
    const { sql, relayGroupId } = this.#options;
    const where = { pipeline: this.#row.name, group: relayGroupId, lane: this.lane };
    for (let progress = true; progress && !this.#fenced && !this.#stopping.signal.aborted;) {
      progress = false;
      const due = await sql<(MessageRow & { key: string; attempts: number })[]>`
        SELECT * FROM (
          SELECT DISTINCT ON (key) key, message_id AS id, outbox_name AS outbox, topic, payload::text AS payload,
                 headers::text AS headers, coalesce(message_created_at, held_at) AS created_at, attempts, next_attempt_at
            FROM tide.relay_held
           WHERE pipeline = ${where.pipeline} AND relay_group_id = ${where.group} AND lane = ${where.lane}
           ORDER BY key, message_id) oldest
         WHERE next_attempt_at <= now()`;
      for (const row of due) {
        if (this.#fenced || this.#abort.signal.aborted) return;
        const message = toMessage(row);
        let failure;
        try {
          [failure] = await this.#sink!.publish([this.#format ? this.#format(message) : message]);
        } catch (error) {
          this.status.fail(error, "retrying a parked message failed; the target looks down");
          break; // an outage spends no attempt: tried again when due
        }
        if (this.#fenced || this.#abort.signal.aborted) return;
        const attempts = row.attempts + 1;
        const dead = failure !== undefined && (!failure.retriable || (this.#retry.maxAttempts > 0 && attempts >= this.#retry.maxAttempts));
        const retryAt = new Date(Date.now() + backoffDelay(attempts, this.#retry));
        await sql`SELECT tide.relay_held_settle(${where.pipeline}, ${where.group}, ${where.lane}, ${row.id},
                                                ${failure ? redactText(failure.error.message) : null}, ${retryAt}, ${dead})`;
        if (!failure) this.status.delivered += 1;
        if (dead) {
          this.status.deadLettered += 1;
          this.#options.events?.deadLettered?.(this.#row.name, 1);
          this.#log.warn("a parked message moved to the dead-letter queue; its key goes on", { id: String(row.id), attempts });
        }
        progress ||= !failure || dead;
      }
    }
    const [state] = await sql<{ keys: string[]; due: Date | null }[]>`
      SELECT coalesce(array_agg(DISTINCT key), '{}') AS keys, min(next_attempt_at) AS due FROM tide.relay_held
       WHERE pipeline = ${where.pipeline} AND relay_group_id = ${where.group} AND lane = ${where.lane}`;
    this.#heldKeys = new Set(state.keys);
    this.#heldDueAt = state.due === null ? Infinity : new Date(state.due).getTime();
  }

  /** Dead letters an operator requeued (tide.relay_dlq_requeue) are delivered once more. */
  async #redeliverRequeued(): Promise<void> {
    if (this.lane !== 0) return; // lane 0 redelivers a pipeline's requeued dead letters
    const rows = await this.#options.sql<(MessageRow & { dlq_id: bigint })[]>`
      SELECT id AS dlq_id, message_id AS id, outbox_name AS outbox, topic, payload::text AS payload, headers::text AS headers,
             coalesce(message_created_at, failed_at) AS created_at
        FROM tide.relay_dlq WHERE pipeline = ${this.#row.name} AND status = 'requeued' ORDER BY id LIMIT 1000`;
    if (rows.length === 0) return;
    const messages = rows.map(toMessage);
    const failures = await this.#sink!.publish(this.#format ? messages.map(this.#format) : messages);
    const failed = new Set(failures.map((f) => f.id));
    const done = rows.filter((row) => !failed.has(row.id)).map((row) => String(row.dlq_id));
    const again = rows.filter((row) => failed.has(row.id)).map((row) => String(row.dlq_id));
    const sql = this.#options.sql;
    await sql`UPDATE tide.relay_dlq SET status = 'redelivered', updated_at = now() WHERE id = ANY(${sql.array(done)}::bigint[])`;
    await sql`UPDATE tide.relay_dlq SET status = 'open', attempts = attempts + 1, updated_at = now()
               WHERE id = ANY(${sql.array(again)}::bigint[])`;
    this.#log.info("requeued dead letters delivered", { delivered: done.length, failed: again.length });
  }

  /**
   * The messages of `batch` that pass the filter, and those it could not decide on (a missing field,
   * a non-bool result). Each undecided one is counted (metric, last_error) and skipped, or, with
   * transform.on_error = "dead_letter", returned to be dead-lettered with the batch's acknowledgement
   * (one transaction: read again after a crash, it is decided again, never recorded twice).
   */
  #matches(batch: OutboxMessage[]): { matching: OutboxMessage[]; undecided: DeadLetter[] } {
    const filter = this.#filter!;
    const matching: OutboxMessage[] = [];
    const undecided: DeadLetter[] = [];
    for (const message of batch) {
      const { match, error } = filter.evaluate({ payload: message.payload, headers: message.headers, topic: message.topic, op: message.op });
      if (match) matching.push(message);
      if (!error) continue;
      this.status.filterFailed(error);
      if (filter.errorPolicy === "dead_letter") undecided.push({ message, error: error.message, attempts: 1 });
    }
    return { matching, undecided };
  }

}

/** A message parked with its key (isolate_poison): the failing one with its error, later ones with none. */
interface Parked {
  message: OutboxMessage;
  key: string;
  error: string | null;
  attempts: number;
}

/** A message on its way to the dead-letter queue, with why and after how many attempts. */
interface DeadLetter {
  message: OutboxMessage;
  error: string;
  attempts: number;
}

/**
 * A message as read: payload and headers as the text PostgreSQL produced (`::text`), never through
 * the driver's JSON.parse, which would round big numbers to the nearest double.
 */
/** A row of consumer_read_batch or consumer_read_ahead: a message with the fence it was read under. */
type FencedRow = MessageRow & { interval_seq: bigint; read_cursor: bigint; generation: bigint };

interface MessageRow {
  id: bigint;
  outbox: string;
  topic: string | null;
  payload: string;
  headers: string | null;
  created_at: Date;
}

export function toMessage(row: MessageRow): OutboxMessage {
  const headers = row.headers === null || row.headers === "{}" ? {} : (parseJson(row.headers) as Record<string, unknown>);
  return outboxMessage({
    id: row.id,
    outbox: row.outbox,
    topic: row.topic,
    payloadText: row.payload,
    headers,
    createdAt: row.created_at,
  });
}

/** The pipeline's lane groups were made for another number of lanes: tide.consumer_lanes_ensure refused. */
class LanesRefused extends Error {}

/** Thrown inside the commit transaction to roll it back when the worker was fenced meanwhile. */
class Fenced extends Error {}

/** The default max_batch_size of a sink that grows batches (growBatches). */
const GROWN_BATCH_SIZE = 1000;
/** A batch grows only while it would stay under this much payload text. */
const GROWN_BATCH_BYTES = 2 * 1024 * 1024;

/** How long a sink gets to react to an abort (or to close) before the worker stops waiting for it. */
const ABANDON_MS = 5_000;
