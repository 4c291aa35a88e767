// The nats connectors: sink "nats" (outbox → subject, JetStream or core) and source "nats"
// (subject → inbox, JetStream durable consumer or core queue group).

export { natsSink, type NatsSinkConfig } from "./sink.ts";
export { natsSource, type NatsSourceConfig } from "./source.ts";
