// Kafka compression codecs. kafkajs ships gzip only; snappy, lz4 and zstd come from optional codec
// packages, registered into kafkajs's global codec table when present. The sink needs the codec it
// compresses with (a missing one fails config validation, naming the package and what is
// available); the source registers whatever is installed so that it can read batches other
// producers compressed.

import type { CompressionTypes } from "kafkajs";
import { loadKafkajs } from "./connection.ts";

export const COMPRESSIONS = ["none", "gzip", "snappy", "lz4", "zstd"] as const;
export type Compression = (typeof COMPRESSIONS)[number];

/**
 * The kafkajs compression type of a config value: Kafka's codec numbers (a record batch's attribute
 * bits), which kafkajs's CompressionTypes names; written out so that kafkajs loads only when a Kafka
 * pipeline runs (tests/unit/kafka_encoder.test.ts compares them with kafkajs's).
 */
export const COMPRESSION_TYPES: Record<Compression, CompressionTypes> = {
  none: 0 as CompressionTypes,
  gzip: 1 as CompressionTypes,
  snappy: 2 as CompressionTypes,
  lz4: 3 as CompressionTypes,
  zstd: 4 as CompressionTypes,
};

type OptionalCodec = "snappy" | "lz4" | "zstd";

/** The package that provides each optional codec, named in errors. */
export const CODEC_PACKAGES: Record<OptionalCodec, string> = {
  snappy: "kafkajs-snappy",
  lz4: "kafkajs-lz4",
  zstd: "@kafkajs/zstd",
};

/**
 * Makes sure kafkajs can use `compression`; resolves with an explanation when it cannot
 * (undefined when it can).
 */
export async function ensureCodec(compression: Compression): Promise<string | undefined> {
  if (compression === "none" || compression === "gzip") return undefined;
  if (await loadCodec(compression)) return undefined;
  const available = await availableCompressions();
  const pkg = CODEC_PACKAGES[compression];
  return `compression "${compression}" is not available: its codec package ${pkg} is not installed; ` +
    `install it next to tide's source (npm install ${pkg}) or choose another (available: ${available.join(", ")})`;
}

/** Every compression this build can use; registers the optional codecs found on the way. */
export async function availableCompressions(): Promise<Compression[]> {
  const found: Compression[] = ["none", "gzip"];
  for (const codec of ["snappy", "lz4", "zstd"] as const) if (await loadCodec(codec)) found.push(codec);
  return found;
}

const loaded = new Map<OptionalCodec, Promise<boolean>>();

function loadCodec(codec: OptionalCodec): Promise<boolean> {
  let result = loaded.get(codec);
  if (!result) {
    result = Promise.all([importCodec(codec), loadKafkajs()]).then(
      ([factory, { CompressionCodecs }]) => {
        (CompressionCodecs as Record<number, CodecFactory>)[COMPRESSION_TYPES[codec]] = factory;
        return true;
      },
      () => false,
    );
    loaded.set(codec, result);
  }
  return result;
}

/** What kafkajs's codec table holds: a factory of `{ compress, decompress }`. */
type CodecFactory = () => { compress(encoder: { buffer: Buffer }): Promise<Buffer>; decompress(buffer: Buffer): Promise<Buffer> };

/**
 * Each package exports its codec differently; all end up as the factory kafkajs calls per use.
 * kafkajs-snappy is a dependency of tide: its literal specifier lets `bun build --compile` bundle it.
 * The lz4 and zstd packages are not (lz4 and zstd need native bindings): their specifiers are
 * variables so that bundling does not require them, which means they load only when tide runs from
 * source with the package installed next to it, never in the compiled binary.
 */
async function importCodec(codec: OptionalCodec): Promise<CodecFactory> {
  switch (codec) {
    case "snappy": {
      // kafkajs-snappy exports the factory itself.
      return asFactory(exported(await import("kafkajs-snappy")));
    }
    case "lz4": {
      // kafkajs-lz4 exports a class whose instances carry `.codec` (an object or a factory by version).
      const LZ4Codec = exported(await import(CODEC_PACKAGES.lz4)) as new () => { codec: unknown };
      return asFactory(new LZ4Codec().codec);
    }
    case "zstd": {
      // @kafkajs/zstd exports a function of (compressionParams, decompressionParams) returning the factory.
      return asFactory((exported(await import(CODEC_PACKAGES.zstd)) as () => unknown)());
    }
  }
}

/** A CommonJS module's export, however the runtime wrapped it (default, or default of default). */
function exported(module: { default?: unknown }): unknown {
  let value: unknown = module.default ?? module;
  if (value && typeof value === "object" && "default" in value) value = (value as { default: unknown }).default;
  return value;
}

function asFactory(candidate: unknown): CodecFactory {
  if (typeof candidate === "function") return candidate as CodecFactory;
  if (candidate && typeof (candidate as { compress?: unknown }).compress === "function") {
    return () => candidate as ReturnType<CodecFactory>;
  }
  throw new Error("unrecognized codec module shape");
}
