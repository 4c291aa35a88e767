// Prometheus metrics (prom-client, which runs on Bun and Deno). Labels are bounded: a pipeline name
// and a direction, never anything per message. Also keeps a short per-pipeline history of
// throughput and lag for the status page.

import client from "prom-client";
import type { RelayEvents } from "../engine/events.ts";

/** One sample per pipeline every HISTORY_STEP_MS, kept for HISTORY_LENGTH steps (30 minutes). */
export const HISTORY_STEP_MS = 10_000;
export const HISTORY_LENGTH = 180;

export interface HistoryPoint {
  at: number;
  /** Messages delivered (forward) or consumed (reverse) during the step. */
  messages: number;
  lag: number | null;
}

/** One inbox's row of the tide.inbox_stats view: claimed and failed are part of pending. */
export interface InboxCounts {
  inbox: string;
  pending: number;
  claimed: number;
  failed: number;
  dead_lettered: number;
  oldest_pending_at: Date | null;
}

/** How long one scrape reuses the inbox counts it read, so its gauges cost one query. */
const INBOX_COUNTS_REUSE_MS = 1_000;

export interface LagSource {
  /** Current lag per pipeline owned by this relay (forward pipelines only). */
  lag(): Promise<Map<string, number>>;
  /** Health per owned pipeline. */
  health(): Map<string, boolean>;
  ownedCount(): number;
  /** Messages parked by isolate_poison per owned pipeline (tide.relay_held). */
  held?(): Promise<Map<string, number>>;
}

export class RelayMetrics {
  readonly registry = new client.Registry();
  readonly events: RelayEvents;
  readonly #published: client.Counter<"pipeline" | "direction">;
  readonly #consumed: client.Counter<"pipeline" | "direction">;
  readonly #latency: client.Histogram<"pipeline">;
  readonly #errors: client.Counter<"pipeline" | "direction">;
  readonly #dlq: client.Counter<"pipeline">;
  readonly #dedup: client.Counter<"pipeline">;
  readonly #filtered: client.Counter<"pipeline">;
  readonly #filterErrors: client.Counter<"pipeline">;
  readonly #staleAcks: client.Counter<"pipeline">;
  readonly #batches: client.Counter<"pipeline">;
  readonly #history = new Map<string, HistoryPoint[]>();
  readonly #window = new Map<string, number>();
  #source: LagSource | undefined;
  #timer: ReturnType<typeof setInterval> | undefined;
  #readInboxes: (() => Promise<InboxCounts[]>) | undefined;
  #inboxCounts: { at: number; counts: Promise<InboxCounts[]> } | undefined;

  constructor() {
    const registers = [this.registry];
    const prefix = "pg_tide_relay_";
    this.#published = new client.Counter({
      name: `${prefix}messages_published_total`,
      help: "Messages a forward pipeline delivered and its sink acknowledged",
      labelNames: ["pipeline", "direction"],
      registers,
    });
    this.#consumed = new client.Counter({
      name: `${prefix}messages_consumed_total`,
      help: "Messages a reverse pipeline wrote into its inbox (new rows)",
      labelNames: ["pipeline", "direction"],
      registers,
    });
    this.#latency = new client.Histogram({
      name: `${prefix}delivery_latency_seconds`,
      help: "Time from outbox_publish to the sink's acknowledgement",
      labelNames: ["pipeline"],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
      registers,
    });
    this.#errors = new client.Counter({
      name: `${prefix}publish_errors_total`,
      help: "Failed delivery, read or write attempts (each is retried)",
      labelNames: ["pipeline", "direction"],
      registers,
    });
    this.#dlq = new client.Counter({
      name: `${prefix}dlq_entries_written_total`,
      help: "Messages moved to the forward dead-letter queue",
      labelNames: ["pipeline"],
      registers,
    });
    this.#dedup = new client.Counter({
      name: `${prefix}dedup_skipped_total`,
      help: "Inbound messages dropped as duplicates of an existing inbox event_id",
      labelNames: ["pipeline"],
      registers,
    });
    this.#filtered = new client.Counter({
      name: `${prefix}messages_filtered_total`,
      help: "Messages skipped by a pipeline's transform.filter",
      labelNames: ["pipeline"],
      registers,
    });
    this.#batches = new client.Counter({
      name: `${prefix}batches_delivered_total`,
      help: "Batches a forward pipeline's sink acknowledged (messages_published_total / this: the average batch)",
      labelNames: ["pipeline"],
      registers,
    });
    this.#staleAcks = new client.Counter({
      name: `${prefix}stale_acks_total`,
      help: "Acknowledgements refused because the position moved since the batch was read (fencing)",
      labelNames: ["pipeline"],
      registers,
    });
    this.#filterErrors = new client.Counter({
      name: `${prefix}filter_errors_total`,
      help: "Messages a pipeline's transform.filter could not decide on (skipped, or dead-lettered with on_error = dead_letter)",
      labelNames: ["pipeline"],
      registers,
    });
    const metrics = this;
    new client.Gauge({
      name: `${prefix}pipeline_healthy`,
      help: "1 when the pipeline's last attempt succeeded, 0 while it is failing",
      labelNames: ["pipeline"],
      registers,
      collect() {
        this.reset();
        for (const [pipeline, healthy] of metrics.#source?.health() ?? []) this.set({ pipeline }, healthy ? 1 : 0);
      },
    });
    new client.Gauge({
      name: `${prefix}consumer_lag`,
      help: "Committed messages the pipeline's consumer group has not delivered yet",
      labelNames: ["pipeline"],
      registers,
      async collect() {
        this.reset();
        for (const [pipeline, lag] of (await metrics.#source?.lag()) ?? []) this.set({ pipeline }, lag);
      },
    });
    new client.Gauge({
      name: `${prefix}held_messages`,
      help: "Messages parked with their key by isolate_poison, waiting for a retry (tide.relay_held), over the lanes owned here",
      labelNames: ["pipeline"],
      registers,
      async collect() {
        this.reset();
        for (const [pipeline, held] of (await metrics.#source?.held?.()) ?? []) this.set({ pipeline }, held);
      },
    });
    const inboxGauges: [string, string, (c: InboxCounts) => number | null][] = [
      ["inbox_pending", "Inbox messages not processed and not dead-lettered (what tide.inbox_pending returns)", (c) => c.pending],
      ["inbox_claimed", "Pending inbox messages a worker holds under a claim that has not run out", (c) => c.claimed],
      ["inbox_failed", "Pending inbox messages that failed at least once (waiting for or in a retry)", (c) => c.failed],
      ["inbox_dead_lettered", "Inbox messages that failed max_retries times", (c) => c.dead_lettered],
      ["inbox_oldest_pending_age_seconds", "Age of the oldest pending inbox message (absent when none is pending)",
        (c) => c.oldest_pending_at === null ? null : Math.max(0, (Date.now() - c.oldest_pending_at.getTime()) / 1000)],
    ];
    for (const [name, help, value] of inboxGauges) {
      new client.Gauge({
        name: `${prefix}${name}`,
        help,
        labelNames: ["inbox"],
        registers,
        async collect() {
          this.reset();
          for (const counts of await metrics.#inboxes()) {
            const v = value(counts);
            if (v !== null) this.set({ inbox: counts.inbox }, v);
          }
        },
      });
    }
    new client.Gauge({
      name: `${prefix}owned_pipelines`,
      help: "Pipelines this relay owns right now",
      registers,
      collect() {
        this.set(metrics.#source?.ownedCount() ?? 0);
      },
    });

    this.events = {
      delivered: (pipeline, messages) => {
        this.#published.inc({ pipeline, direction: "forward" }, messages.length);
        this.#batches.inc({ pipeline });
        const now = Date.now();
        const latency = this.#latency.labels({ pipeline });
        for (const message of messages) latency.observe(Math.max(0, now - message.createdAt.getTime()) / 1000);
        this.#count(pipeline, messages.length);
      },
      consumed: (pipeline, inserted, duplicates) => {
        this.#consumed.inc({ pipeline, direction: "reverse" }, inserted);
        if (duplicates > 0) this.#dedup.inc({ pipeline }, duplicates);
        this.#count(pipeline, inserted);
      },
      failed: (pipeline, direction) => this.#errors.inc({ pipeline, direction }),
      deadLettered: (pipeline, count) => this.#dlq.inc({ pipeline }, count),
      filtered: (pipeline, count) => this.#filtered.inc({ pipeline }, count),
      filterFailed: (pipeline) => this.#filterErrors.inc({ pipeline }),
      staleAck: (pipeline) => this.#staleAcks.inc({ pipeline }),
    };
  }

  /** Starts sampling history from the relay's state. */
  attach(source: LagSource): void {
    this.#source = source;
    this.#timer = setInterval(() => void this.#sample(), HISTORY_STEP_MS);
  }

  detach(): void {
    clearInterval(this.#timer);
  }

  /** Where the inbox gauges read their counts at scrape time (every inbox of the database). */
  observeInboxes(read: () => Promise<InboxCounts[]>): void {
    this.#readInboxes = read;
  }

  async #inboxes(): Promise<InboxCounts[]> {
    if (!this.#readInboxes) return [];
    const now = Date.now();
    if (!this.#inboxCounts || now - this.#inboxCounts.at > INBOX_COUNTS_REUSE_MS) {
      this.#inboxCounts = { at: now, counts: this.#readInboxes() };
    }
    try {
      return await this.#inboxCounts.counts;
    } catch {
      this.#inboxCounts = undefined;
      return []; // the database may be briefly unreachable: no inbox samples this scrape
    }
  }

  async text(): Promise<string> {
    return await this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  /** Samples of the last minutes, oldest first. */
  history(pipeline: string): HistoryPoint[] {
    return this.#history.get(pipeline) ?? [];
  }

  /** Messages per second over the last minute of completed steps (the open step until one completes). */
  throughput(pipeline: string): number {
    const points = this.history(pipeline).slice(-6);
    const total = points.reduce((sum, p) => sum + p.messages, 0);
    return points.length === 0 ? (this.#window.get(pipeline) ?? 0) / (HISTORY_STEP_MS / 1000) : total / (points.length * HISTORY_STEP_MS / 1000);
  }

  #count(pipeline: string, n: number): void {
    this.#window.set(pipeline, (this.#window.get(pipeline) ?? 0) + n);
  }

  async #sample(): Promise<void> {
    let lags = new Map<string, number>();
    try {
      lags = (await this.#source?.lag()) ?? lags;
    } catch {
      // the database may be briefly unreachable; keep the throughput sample anyway
    }
    const pipelines = new Set([...this.#window.keys(), ...lags.keys(), ...(this.#source?.health().keys() ?? [])]);
    const at = Date.now();
    for (const pipeline of pipelines) {
      const points = this.#history.get(pipeline) ?? [];
      points.push({ at, messages: this.#window.get(pipeline) ?? 0, lag: lags.get(pipeline) ?? null });
      if (points.length > HISTORY_LENGTH) points.shift();
      this.#history.set(pipeline, points);
    }
    this.#window.clear();
  }
}
