// Where the broker benchmarks deliver: a fresh Kafka topic or JetStream stream per run, with the
// pipeline config that targets it, a count of what it holds and its removal (compare.ts, brokers.ts,
// lanes.ts).

import { type Kafka } from "kafkajs";
import { type JetStreamManager } from "@nats-io/jetstream";

export const KAFKA_BROKER = "127.0.0.1:9092";
export const NATS_URL = "nats://127.0.0.1:4222";

export type BrokerSink = "kafka" | "nats";

export interface Target {
  /** The sink config of a pipeline that delivers here. */
  config: Record<string, unknown>;
  /** Messages the topic or stream holds. */
  count(): Promise<number>;
  drop(): Promise<void>;
}

export interface Brokers {
  kafka: Kafka;
  jsm: JetStreamManager;
}

/** A Kafka topic (`partitions`, default 1; acks "all") or a JetStream stream (PubAck per message) named after `name`. */
export async function createTarget(brokers: Brokers, sink: BrokerSink, name: string, partitions = 1): Promise<Target> {
  const safe = name.replace(/\W/g, "_");
  if (sink === "kafka") {
    const topic = `bench-${name}`;
    const admin = brokers.kafka.admin();
    await admin.connect();
    await admin.createTopics({ topics: [{ topic, numPartitions: partitions }], waitForLeaders: true });
    return {
      config: { brokers: KAFKA_BROKER, topic, acks: "all" },
      async count() {
        const offsets = await admin.fetchTopicOffsets(topic);
        return offsets.reduce((sum, p) => sum + Number(p.high) - Number(p.low), 0);
      },
      async drop() {
        await admin.deleteTopics({ topics: [topic] }).catch(() => {});
        await admin.disconnect();
      },
    };
  }
  const stream = `BENCH_${safe}`;
  const subject = `bench.${safe}.orders`;
  await brokers.jsm.streams.add({ name: stream, subjects: [subject] });
  return {
    config: { url: NATS_URL, subject, mode: "jetstream" },
    async count() {
      return (await brokers.jsm.streams.info(stream)).state.messages;
    },
    async drop() {
      await brokers.jsm.streams.delete(stream).catch(() => {});
    },
  };
}
