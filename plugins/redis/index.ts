// The redis connectors (Redis Streams, with ioredis): sink "redis" (outbox → stream, XADD) and
// source "redis" (stream → inbox, a consumer group acknowledged after the inbox commit).

export { redisSink, type RedisSinkConfig } from "./sink.ts";
export { redisSource, type RedisSourceConfig } from "./source.ts";
