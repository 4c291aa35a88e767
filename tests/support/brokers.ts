// What the broker scenario suites (tests/brokers) share: names unique per run, a kafkajs client that
// reads back what the relay produced (snappy included), JetStream streams that are deleted again,
// Prometheus text parsing, Kafka's start/stop script for the outage scenario, and private
// nats-server instances for authentication and permission scenarios.

import { CompressionCodecs, CompressionTypes, Kafka, logLevel, type Consumer, type IHeaders } from "kafkajs";
import SnappyCodec from "kafkajs-snappy";
import { connect, headers as natsHeaders, type MsgHdrs, type NatsConnection } from "@nats-io/transport-node";
import { jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { freePort } from "./postgres.ts";
import { waitFor } from "./relay.ts";
import { reachable, REQUIRE_SERVICES } from "./services.ts";

export const KAFKA_BROKER = "127.0.0.1:9092";
export const NATS_URL = "nats://127.0.0.1:4222";

const ROOT = `${import.meta.dir}/../..`;

// The relay may compress with snappy; a reader needs the codec to decompress.
(CompressionCodecs as Record<number, unknown>)[CompressionTypes.Snappy] = SnappyCodec;

/** A token unique to this run (lowercase letters and digits), for topic, subject and stream names. */
export function unique(): string {
  return `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
}

// ---------------------------------------------------------------------------------------------
// Kafka

export function kafkaClient(): Kafka {
  return new Kafka({ clientId: "tide-broker-tests", brokers: [KAFKA_BROKER], logLevel: logLevel.NOTHING });
}

export interface KafkaRecord {
  topic: string;
  partition: number;
  offset: string;
  key: string | null;
  /** The value as UTF-8 text; null for a tombstone. */
  value: string | null;
  headers: Record<string, string>;
}

/**
 * A consumer with a fresh group reading `topics` from the beginning into `records` until stopped.
 * Topics that do not exist yet are created (single partition), so that it can start before the relay.
 */
export class KafkaReader {
  readonly records: KafkaRecord[] = [];
  readonly #consumer: Consumer;

  private constructor(consumer: Consumer) {
    this.#consumer = consumer;
  }

  static async start(topics: string[]): Promise<KafkaReader> {
    const kafka = kafkaClient();
    await createTopics(kafka, topics);
    const consumer = kafka.consumer({ groupId: `tide-test-reader-${unique()}`, maxWaitTimeInMs: 200 });
    const reader = new KafkaReader(consumer);
    await consumer.connect();
    await consumer.subscribe({ topics, fromBeginning: true });
    await consumer.run({
      eachMessage: async ({ topic, partition, message }) => {
        reader.records.push({
          topic,
          partition,
          offset: message.offset,
          key: message.key?.toString() ?? null,
          value: message.value?.toString() ?? null,
          headers: headerText(message.headers),
        });
      },
    });
    return reader;
  }

  /** Waits until at least `count` records arrived; returns them all. */
  async waitForCount(count: number, timeoutMs = 30_000): Promise<KafkaRecord[]> {
    await waitFor(`${count} Kafka records (have ${this.records.length})`, () => this.records.length >= count, timeoutMs);
    return this.records;
  }

  async stop(): Promise<void> {
    await this.#consumer.disconnect().catch(() => {});
  }
}

/** Reads `count` records of `topic` from the beginning with a fresh group, then disconnects. */
export async function readKafka(topic: string, count: number, timeoutMs = 30_000): Promise<KafkaRecord[]> {
  const reader = await KafkaReader.start([topic]);
  try {
    return [...(await reader.waitForCount(count, timeoutMs))];
  } finally {
    await reader.stop();
  }
}

/** Produces records as another service would (plain producer, no tide headers). */
export async function produceKafka(topic: string, messages: { key?: string; value: string | Buffer | null; headers?: IHeaders }[]) {
  const kafka = kafkaClient();
  await createTopics(kafka, [topic]);
  const producer = kafka.producer();
  await producer.connect();
  try {
    await producer.send({ topic, messages });
  } finally {
    await producer.disconnect();
  }
}

export async function createTopics(kafka: Kafka, topics: string[]): Promise<void> {
  const admin = kafka.admin();
  await admin.connect();
  try {
    await admin.createTopics({ topics: topics.map((topic) => ({ topic, numPartitions: 1 })), waitForLeaders: true });
  } finally {
    await admin.disconnect();
  }
}

function headerText(headers: IHeaders | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers ?? {})) if (value !== undefined) out[name] = String(value);
  return out;
}

/** True when scripts/kafka.sh started the broker that answers (so the outage test may stop it). */
export function kafkaManagedByScript(): boolean {
  return Bun.spawnSync(["bash", "scripts/kafka.sh", "status"], { cwd: ROOT }).exitCode === 0;
}

/** `scripts/kafka.sh start|stop`; throws with its output when it fails. */
export async function kafkaScript(command: "start" | "stop"): Promise<void> {
  const child = Bun.spawn(["bash", "scripts/kafka.sh", command], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
  const [code, out, err] = await Promise.all([child.exited, new Response(child.stdout).text(), new Response(child.stderr).text()]);
  if (code !== 0) throw new Error(`scripts/kafka.sh ${command} exited with ${code}: ${out}${err}`);
}

// ---------------------------------------------------------------------------------------------
// NATS

/** A NATS connection plus the JetStream streams created through it, deleted by close(). */
export class NatsTestClient {
  readonly nc: NatsConnection;
  readonly jsm: JetStreamManager;
  readonly #streams: string[] = [];

  private constructor(nc: NatsConnection, jsm: JetStreamManager) {
    this.nc = nc;
    this.jsm = jsm;
  }

  static async connect(): Promise<NatsTestClient> {
    const nc = await connect({ servers: NATS_URL });
    return new NatsTestClient(nc, await jetstreamManager(nc));
  }

  /** A stream storing `subjects`; deleted by close(). */
  async createStream(name: string, subjects: string[]): Promise<string> {
    await this.jsm.streams.add({ name, subjects });
    this.#streams.push(name);
    return name;
  }

  /** Publishes on core NATS (as `nats pub` does) and waits until the server has it. */
  async publish(subject: string, body: string | Uint8Array, headers?: Record<string, string>): Promise<void> {
    let h: MsgHdrs | undefined;
    if (headers) {
      h = natsHeaders();
      for (const [name, value] of Object.entries(headers)) h.set(name, value);
    }
    this.nc.publish(subject, body, { headers: h });
    await this.nc.flush();
  }

  async close(): Promise<void> {
    for (const name of this.#streams) await this.jsm.streams.delete(name).catch(() => {});
    await this.nc.drain().catch(() => {});
  }
}

// ---------------------------------------------------------------------------------------------
// Prometheus

/**
 * The value of one sample in Prometheus text: `name{labels...} value`, where every label given
 * matches (others may be present). Undefined when there is no such sample.
 */
export function metricValue(text: string, name: string, labels: Record<string, string> = {}): number | undefined {
  for (const line of text.split("\n")) {
    if (!line.startsWith(name)) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$/.exec(line);
    if (!match || match[1] !== name) continue;
    const found = Object.fromEntries([...(match[2] ?? "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((m) => [m[1], m[2]]));
    if (Object.entries(labels).every(([k, v]) => found[k] === v)) return Number(match[3]);
  }
  return undefined;
}

/** GET /metrics of a relay started with metricsAddr. */
export async function scrape(port: number | undefined): Promise<string> {
  if (!port) throw new Error("the relay serves no HTTP (start it with metricsAddr)");
  const response = await fetch(`http://127.0.0.1:${port}/metrics`);
  if (!response.ok) throw new Error(`/metrics answered ${response.status}`);
  return await response.text();
}

/**
 * True when the `nats-server` binary is on PATH. When it is not: throws under
 * TIDE_REQUIRE_SERVICES=1, else says why the suite is skipped (use with describe.skipIf).
 */
export function requireNatsServerBinary(): boolean {
  if (Bun.which("nats-server")) return true;
  const reason = "the nats-server binary is not on PATH";
  if (REQUIRE_SERVICES) throw new Error(`${reason} (TIDE_REQUIRE_SERVICES=1)`);
  console.warn(`skipping private nats-server tests: ${reason}`);
  return false;
}

/** A nats-server of a test's own, on a free port, started from a config text; stop() ends it and removes its files. */
export interface PrivateNatsServer {
  url: string;
  port: number;
  stop(): Promise<void>;
}

/**
 * Starts `nats-server` with `config` (its `listen` and, with JetStream, `store_dir` are added here)
 * and waits until it accepts connections. For what the shared server cannot show: authentication
 * and permissions.
 */
export async function startNatsServer(config: string, options: { jetstream?: boolean } = {}): Promise<PrivateNatsServer> {
  const dir = await mkdtemp(join(tmpdir(), "tide-nats-"));
  const port = await freePort();
  const jetstream = options.jetstream ? `jetstream { store_dir: "${join(dir, "js")}" }\n` : "";
  const log = join(dir, "nats.log");
  await writeFile(join(dir, "nats.conf"), `listen: "127.0.0.1:${port}"\nlog_file: "${log}"\n${jetstream}${config}\n`);
  const child = Bun.spawn(["nats-server", "-c", join(dir, "nats.conf")], { stdout: "ignore", stderr: "ignore" });
  const stop = async () => {
    child.kill();
    await child.exited;
    await rm(dir, { recursive: true, force: true });
  };
  try {
    await waitFor(`nats-server on port ${port}`, async () => {
      if (child.exitCode !== null) throw new Error(`nats-server exited with ${child.exitCode}: ${await readFile(log, "utf8").catch(() => "")}`);
      return await reachable("127.0.0.1", port);
    }, 10_000);
  } catch (error) {
    await stop();
    throw error;
  }
  return { url: `nats://127.0.0.1:${port}`, port, stop };
}
