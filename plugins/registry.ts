// The built-in plugins. They go through the same loader and contract tests as drop-in plugins;
// adding one is an import and an entry below.

import type { PluginDefinition } from "../core/plugin.ts";
import file from "./file/index.ts";
import inbox from "./inbox/index.ts";
import { kafkaSink, kafkaSource } from "./kafka/index.ts";
import { mqttSink, mqttSource } from "./mqtt/index.ts";
import { natsSink, natsSource } from "./nats/index.ts";
import { rabbitmqSink, rabbitmqSource } from "./rabbitmq/index.ts";
import { redisSink, redisSource } from "./redis/index.ts";
import stdout from "./stdout/index.ts";
import webhook from "./webhook/index.ts";
import { webhookSource } from "./webhook/source.ts";

export const builtinPlugins: PluginDefinition[] = [
  stdout,
  file,
  webhook,
  inbox,
  kafkaSink,
  natsSink,
  rabbitmqSink,
  redisSink,
  mqttSink,
  webhookSource,
  kafkaSource,
  natsSource,
  rabbitmqSource,
  redisSource,
  mqttSource,
];
