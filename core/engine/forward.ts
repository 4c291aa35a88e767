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

import type { Sql } from "../db.ts";
import { waitForWork, type IdleProbe } from "./idle_probe.ts";
import { backoffDelay, sleep, Wakeup, type BackoffPolicy } from "./backoff.ts";
import { connectPlugin, drainAndClose } from "./worker_lifecycle.ts";
import { failpoint, publishThroughFailpoints, type FailpointName } from "./failpoints.ts";
import { ConfigError } from "../errors.ts";
import type { FilterFn } from "../config/filter.ts";
import type { Formatter } from "../config/wire_format.ts";
import type { RelayEvents } from "./events.ts";
import { WorkerStatus } from "./worker_status.ts";
import type { Logger } from "../log.ts";
import type { OutboxMessage, SinkInstance } from "../plugin.ts";
import type { PipelineRow } from "../pipeline.ts";
import type { RetryPolicy } from "../config/engine_config.ts";
import { preparePipeline } from "../config/pipeline_config.ts";
import { pluginContext, type PluginRegistry } from "../plugins.ts";
import { laneCount, laneGroup, laneKeyText, laneOf, ownershipUnit, type LaneKey } from "./lanes.ts";
import { matchFilter, maxBatchSize, nextLimit, sortFailures, type Batch, type DeadLetter, type Fence, type Parked } from "./forward_batch.ts";
import { ConsumerGroup, LanesRefused } from "./consumer_group.ts";
import { HeldKeys } from "./poison.ts";
import { commitWithDeadLetters, redeliverRequeued } from "./dead_letters.ts";

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
  /** The pipeline's retry, on_failure and poll_interval_ms, set from its checked config by start(). */
  #retry!: RetryPolicy;
  #pauseOnFailure = false;
  #pollIntervalMs: number | undefined;
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
  /** How many messages the next read asks for: batch_size, grown while a backlog lasts (nextLimit). */
  #limit: number;
  /** The most #limit grows to: max_batch_size, or batch_size when the sink does not grow batches. */
  #maxLimit: number;
  /** This worker's lane, of #lanes; it delivers only the messages whose key hashes to it. */
  readonly lane: number;
  readonly lanes: number;
  /** The pipeline's own consumer group (lane 0's), from whose position the other lanes start. */
  readonly #baseGroup: string;
  #laneKey!: LaneKey;
  /** The reads return every lane's messages (lanes made before schema version 15): this worker picks its own. */
  #pickLane = false;
  /** isolate_poison: a failing message and its key's later messages are parked (tide.relay_held). */
  #isolate = false;
  /** The keys with parked messages, and when the next one is due for a retry. */
  readonly #held: HeldKeys;
  /** The statements on this worker's consumer group (the lane's). */
  readonly #group: ConsumerGroup;

  constructor(row: PipelineRow, options: ForwardOptions) {
    this.lanes = laneCount(row.config);
    this.lane = options.lane ?? 0;
    this.#baseGroup = row.consumer_group!;
    // A lane reads its own group: every read, acknowledgement and probe below goes to it.
    this.#row = this.lanes > 1 ? { ...row, consumer_group: laneGroup(row.consumer_group!, this.lane, this.lanes) } : row;
    this.#options = options;
    this.#log = options.logger.child(this.lanes > 1 ? { pipeline: row.name, lane: this.lane } : { pipeline: row.name });
    this.status = new WorkerStatus(row.name, "forward", this.#log, options.events);
    this.#limit = this.#maxLimit = row.batch_size;
    this.#held = new HeldKeys(options.sql, { pipeline: row.name, group: options.relayGroupId, lane: this.lane }, this.status, this.#log, options.events);
    this.#group = new ConsumerGroup(options.sql, this.#row.outbox_name!, this.#row.consumer_group!, options.relayGroupId);
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
    const engine = prepared.engine;
    if (prepared.definition.kind !== "sink" || engine.direction !== "forward") throw new ConfigError(`pipeline "${this.#row.name}": not a sink`);
    this.#filter = prepared.filter;
    this.#format = prepared.format;
    this.#laneKey = engine.lanes.key;
    this.#isolate = engine.isolatePoison;
    this.#retry = engine.retry;
    this.#pauseOnFailure = engine.onFailure === "pause";
    this.#pollIntervalMs = engine.pollIntervalMs;
    const ctx = {
      ...pluginContext(this.#row.name, this.#log, this.#abort.signal, this.#row.batch_size, this.#options.postgresUrl),
      relayGroupId: this.#options.relayGroupId,
      failpoint: (name: string) => failpoint(name as FailpointName),
    };
    this.#maxLimit = maxBatchSize(this.#row.name, this.#row.batch_size, engine.maxBatchSize, prepared.definition.growBatches);
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
    await drainAndClose(this.#loop, this.#abort, drainMs, () => this.#sink?.close(), "sink", this.#log);
  }

  async #run(): Promise<void> {
    const stop = this.#stopping.signal;
    await connectPlugin(() => this.#sink!.connect(), "sink", this.status, this.#retry, stop);
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
        if (this.#ownerEpoch === undefined) {
          // The lanes' groups start together from lane 0's position (refused when the pipeline ran
          // with another number of lanes), then taking the lane over: from now on a former owner's
          // acknowledgements are refused.
          const inDatabase = await this.#group.prepareLanes(this.#baseGroup,
            { lane: this.lane, lanes: this.lanes, key: [this.#laneKey.root, ...this.#laneKey.path] }, this.#row.name);
          this.#pickLane = this.lanes > 1 && !inDatabase;
          this.#ownerEpoch = await this.#group.claim();
        }
        if (this.#isolate && this.#held.due()) {
          await this.#held.retry(this.#sink!, this.#format, this.#retry, () => this.#fenced || stop.aborted,
            () => this.#fenced || this.#abort.signal.aborted);
        }
        const readBefore = await ahead;
        ahead = undefined;
        const batch = readBefore !== undefined ? readBefore : await this.#group.read(this.#limit, this.#ownerEpoch);
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
        this.#limit = nextLimit(batch.messages, full, this.#limit, this.#maxLimit, this.#row.batch_size);
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
    try {
      return await this.#group.readAhead(batch, this.#limit, this.#ownerEpoch!);
    } catch (error) {
      this.#log.debug("reading ahead failed; reading after the acknowledgement instead", { error });
      return undefined;
    }
  }

  /**
   * Nothing to read: wait until the relay's shared probe finds something for this pipeline (checked
   * every few milliseconds right after it was busy, then less and less often, up to its poll
   * interval), a NOTIFY wakes it, or it is stopped. Without a probe, poll at the poll interval.
   */
  async #idle(): Promise<void> {
    const pollMs = this.#pollIntervalMs ?? this.#options.pollIntervalMs;
    const watch = { outbox: this.#row.outbox_name!, group: this.#row.consumer_group!, pollMs, busyAt: this.#busyAt };
    this.status.waiting = true;
    try {
      // Parked messages due for a retry end the wait too.
      await waitForWork(this.#options.probe, watch, this.#wakeup, this.#held.dueAt, this.#stopping.signal);
    } finally {
      this.status.waiting = false;
    }
  }

  /**
   * Delivers a batch with retries; true once it is acknowledged (position moved). With `readNext`,
   * the acknowledgement also reads the next batch (#readWithAck).
   */
  async #deliver(batch: OutboxMessage[], readNext = false): Promise<boolean> {
    const startedAt = Date.now();
    const stop = this.#stopping.signal;
    // Lanes made before schema version 15 read every message: the other lanes' are skipped like
    // filtered ones, the position moves past them.
    const mine = this.#pickLane ? batch.filter((m) => laneOf(m, this.#laneKey, this.lanes) === this.lane) : batch;
    const { matching, undecided } = this.#filter
      ? matchFilter(this.#filter, mine, (error) => this.status.filterFailed(error)) : { matching: mine, undecided: [] };
    const formatted = this.#format ? matching.map(this.#format) : matching;
    const attempts = new Map<bigint, number>();
    const dead: DeadLetter[] = [...undecided];
    // isolate_poison: messages of keys with parked messages are parked behind them, unsent.
    const keys = this.#isolate ? new Map(matching.map((m) => [m.id, laneKeyText(m, this.#laneKey) ?? ""])) : undefined;
    const { passing, parked } = keys ? this.#held.split(formatted, keys) : { passing: formatted, parked: [] as Parked[] };
    let pending = passing;
    while (pending.length > 0) {
      let failures;
      try {
        failures = await publishThroughFailpoints((messages: OutboxMessage[]) => this.#sink!.publish(messages), pending);
      } catch (error) {
        // The whole batch failed (target down): keep it in the outbox and retry without a budget.
        this.status.fail(error, "delivery failed", { batch: pending.length });
        if (stop.aborted) return false;
        await sleep(this.status.retryDelay(this.#retry), stop);
        if (stop.aborted) return false;
        continue;
      }
      if (this.#abort.signal.aborted) return false; // cut off: the batch stays unacknowledged
      const { retry, outage, untried } = sortFailures(pending, failures, keys, this.#retry.maxAttempts, { attempts, dead, parked });
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
      // Held back only behind a message that is dead-lettered or parked now: send them at once
      // (with isolate_poison, the other keys keep flowing while a poison message waits).
      if (pending.length > 0 && !untried) {
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
    const commit = (sql: Sql) => this.#group.commit(sql, last, batch.length, fence);
    // Without dead letters the commit is one statement, one round trip (reading the next batch too
    // when asked); with them (and parked messages), one transaction: both are recorded, or neither.
    const owner = { pipeline: this.#row.name, relayGroupId: this.#options.relayGroupId, lane: this.lane };
    const moved = dead.length > 0 || parked.length > 0
      ? await commitWithDeadLetters(this.#options.sql, commit, owner, dead, parked, () => this.#fenced || this.#abort.signal.aborted)
      : readNext ? await this.#commitAndRead(last, batch.length, fence)
      : await commit(this.#options.sql);
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
    this.#held.parked(parked, this.#retry);
    if (dead.length > 0) {
      this.status.deadLettered += dead.length;
      this.#options.events?.deadLettered?.(this.#row.name, dead.length);
      this.#log.warn("messages moved to the dead-letter queue", { count: dead.length, first_error: dead[0].error });
    }
    return true;
  }

  /** The commit, and when it moved the position, the read of the next batch into #readWithAck: one round trip. */
  async #commitAndRead(last: bigint, count: number, fence: Fence): Promise<boolean> {
    const next = await this.#group.commitAndRead(last, count, fence, this.#limit, this.#ownerEpoch!);
    if (next === undefined) return false;
    this.#readWithAck = next;
    return true;
  }

  /** Dead letters an operator requeued (tide.relay_dlq_requeue) are delivered once more, by lane 0. */
  async #redeliverRequeued(): Promise<void> {
    if (this.lane === 0) await redeliverRequeued(this.#options.sql, this.#row.name, this.#sink!, this.#format, this.#log);
  }
}

