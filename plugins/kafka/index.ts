// The kafka connectors: sink "kafka" (outbox → topic) and source "kafka" (topic → inbox).

export { kafkaSink, type KafkaSinkConfig } from "./sink.ts";
export { kafkaSource, type KafkaSourceConfig } from "./source.ts";
