// The rabbitmq connectors (AMQP 0-9-1, with amqplib): sink "rabbitmq" (outbox → exchange, with
// publisher confirms) and source "rabbitmq" (queue → inbox, acknowledged after the inbox commit).

export { rabbitmqSink, type RabbitmqSinkConfig } from "./sink.ts";
export { rabbitmqSource, type RabbitmqSourceConfig } from "./source.ts";
