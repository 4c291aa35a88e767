// kafkajs-snappy, imported by codecs.ts, ships no types of its own.
declare module "kafkajs-snappy";
