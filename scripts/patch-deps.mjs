#!/usr/bin/env node
// Runs after npm install: the changes tide applies to dependencies, idempotent, each waiting for an
// upstream release. Each names why and what goes wrong without it.
//
// 1. postgres.js 3.4.x (3.4.9 is the newest release) throws a TypeError from nextWrite when a query is
// written to a reserved connection whose socket has closed (porsager/postgres#1066, #1154, #1208;
// fix proposed in #1209, not released). It is thrown from a timer, out of reach of any await, so
// the process dies: WAL capture holds its transaction on a reserved connection (core/capture/wal_capture.ts)
// and rolls back on it after PostgreSQL ended the session. Steering clear of it in tide's code is
// not enough: release() hands the dead connection back to the pool, whose next query throws the
// same; and catching the throw process-wide leaves the write, and its query, stuck in the driver.
// So nextWrite is guarded as #1209 does: fail the pending queries with CONNECTION_CLOSED instead.
// tests/relay/driver_guard.test.ts proves the guard is in force under Bun and in a compiled binary.
// (kafkajs's negative timer delay is guarded at tide's boundary instead: plugins/kafka/timers.ts.)
//
// 2. kafkajs 2.2.4 (its last release, 2023) spends most of a produce request's CPU on buffers: a
// zero-filled buffer per record that grows by doubling, another per header, a Buffer.from([...]) per
// varint, Long arithmetic per timestamp, three copies of the record batch before the request's own,
// a byte-at-a-time CRC32C, and grouping messages by partition by copying the array per message. Now
// each record is written into one buffer of its size, carved from a slab, varints in place; the
// batch is written once with its length and CRC filled in after; the CRC is crc-32's sliced
// CRC32C; grouping pushes. A 1,000-record request of ~1 KiB records with five headers took 5.8 ms
// to encode and now ~3 (docs/benchmarks.md). The bytes on the wire are the same:
// tests/unit/kafka_encoder.test.ts compares them with what unpatched kafkajs wrote and decodes them
// with kafkajs's own decoder.
//
// 3. postgres.js copies every network chunk that continues a message begun in the chunk before (that
// is, nearly every chunk of a large result: a 1 KiB row rarely ends where a chunk does) into a new
// buffer with what was left of the previous one, to parse on from there. Now only the message that
// spans the two chunks is put together; the rest of the chunk is parsed where it is. What the
// driver hands on is unchanged (the same messages, the same bytes): every query of the test suite
// goes through it, and tests/relay/raw_reads.test.ts reads rows of every size across chunk ends.
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const modules = join(dirname(fileURLToPath(import.meta.url)), "..", "node_modules");

/** The start of postgres.js's data(): where a message continued from the chunk before is completed. */
const DATA_HEAD = `  function data(x) {
    if (incomings) {
      incomings.push(x)
      remaining -= x.length
      if (remaining > 0)
        return
`;

const PATCHES = [
  {
    files: ["postgres/src/connection.js", "postgres/cjs/src/connection.js", "postgres/cf/src/connection.js"],
    mark: "/* tide: guard closed socket */",
    before: "  function nextWrite(fn) {\n",
    after: `  function nextWrite(fn) {
    /* tide: guard closed socket */
    if (!socket) {
      chunk = nextWriteTimer = null
      error(Errors.connection('CONNECTION_CLOSED', options))
      return false
    }
`,
  },
  {
    files: ["kafkajs/src/protocol/encoder.js"],
    mark: "/* tide: unfilled growth */",
    before: "      const newBuffer = Buffer.alloc(newLength)\n",
    after: "      /* tide: unfilled growth */\n      const newBuffer = Buffer.allocUnsafe(newLength)\n",
  },
  {
    files: ["kafkajs/src/protocol/encoder.js"],
    mark: "/* tide: varint in place */",
    before: `  writeUVarInt(value) {
    const byteArray = []
    while ((value & UNSIGNED_INT32_MAX_NUMBER) !== 0) {
      byteArray.push((value & OTHER_BITS) | MOST_SIGNIFICANT_BIT)
      value >>>= 7
    }
    byteArray.push(value & OTHER_BITS)
    this.writeBufferInternal(Buffer.from(byteArray))
    return this
  }
`,
    after: `  writeUVarInt(value) {
    /* tide: varint in place */
    this.ensureAvailable(5)
    const buf = this.buf
    let offset = this.offset
    while ((value & UNSIGNED_INT32_MAX_NUMBER) !== 0) {
      buf[offset++] = (value & OTHER_BITS) | MOST_SIGNIFICANT_BIT
      value >>>= 7
    }
    buf[offset++] = value & OTHER_BITS
    this.offset = offset
    return this
  }
`,
  },
  {
    files: ["kafkajs/src/protocol/encoder.js"],
    mark: "/* tide: small varlong */",
    before: `  writeVarLong(value) {
    const byteArray = []
`,
    after: `  writeVarLong(value) {
    /* tide: small varlong */
    if (typeof value === 'number' && Number.isInteger(value) && value >= -0x40000000 && value < 0x40000000) {
      return this.writeUVarInt((value << 1) ^ (value >> 31))
    }
    const byteArray = []
`,
  },
  {
    files: ["kafkajs/src/protocol/recordBatch/record/v0/index.js"],
    mark: "/* tide: one buffer per record */",
    before: `  return new Encoder()
    .writeVarInt(sizeOfBody)
    .writeInt8(0) // no used record attributes at the moment
    .writeVarLong(timestampDelta)
    .writeVarInt(offsetDelta)
    .writeVarIntBytes(key)
    .writeVarIntBytes(value)
    .writeVarIntArray(headersArray.map(Header))
}
`,
    after: `  /* tide: one buffer per record */
  const encoder = new Encoder(Encoder.sizeOfVarInt(sizeOfBody) + sizeOfBody)
    .writeVarInt(sizeOfBody)
    .writeInt8(0) // no used record attributes at the moment
    .writeVarLong(timestampDelta)
    .writeVarInt(offsetDelta)
    .writeVarIntBytes(key)
    .writeVarIntBytes(value)
    .writeVarInt(headersArray.length)
  for (const header of headersArray) {
    encoder.writeVarIntString(header.key).writeVarIntBytes(header.value)
  }
  return encoder
}
`,
  },
  {
    files: ["kafkajs/src/producer/groupMessagesPerPartition.js"],
    mark: "/* tide: group in place */",
    before: `    const current = result[partition] || []
    return Object.assign(result, { [partition]: [...current, message] })
`,
    after: `    /* tide: group in place */
    const current = result[partition] || (result[partition] = [])
    current.push(message)
    return result
`,
  },
  {
    files: ["kafkajs/src/protocol/encoder.js"],
    mark: "/* tide: buffers from a slab */",
    before: "module.exports = class Encoder {\n",
    after: `/* tide: buffers from a slab */
// Small buffers are carved from a shared slab, as Node's Buffer pool does (Bun has none); larger
// ones are allocated without zero-filling. An encoder only ever writes below its offset and reads
// up to it, so what the memory held before is never seen.
const SLAB_BYTES = 64 * 1024
const SLAB_MAX = 4096
let slab = null
let slabOffset = SLAB_BYTES
const allocate = size => {
  if (size > SLAB_MAX) return Buffer.allocUnsafe(size)
  if (slabOffset + size > SLAB_BYTES) {
    slab = Buffer.allocUnsafe(SLAB_BYTES)
    slabOffset = 0
  }
  const buf = slab.subarray(slabOffset, slabOffset + size)
  slabOffset = (slabOffset + size + 7) & ~7
  return buf
}

module.exports = class Encoder {
`,
  },
  {
    files: ["kafkajs/src/protocol/encoder.js"],
    mark: "/* tide: unfilled buffers */",
    before: "    this.buf = Buffer.alloc(Encoder.nextPowerOfTwo(initialSize))\n",
    after: "    /* tide: unfilled buffers */\n    this.buf = allocate(initialSize < 512 ? 512 : initialSize + 1)\n",
  },
  {
    files: ["kafkajs/src/protocol/recordBatch/v0/index.js"],
    mark: "/* tide: one buffer per batch */",
    before: `  const batchBody = new Encoder()
    .writeInt16(attributes)
`,
    after: `  /* tide: one buffer per batch */
  // FirstOffset, Length, PartitionLeaderEpoch, Magic and CRC go first, then the body the CRC covers,
  // all written once into one buffer of the batch's size; Length and CRC are filled in at the end.
  const recordsSize = records.reduce((size, record) => size + (record instanceof Encoder ? record.size() : 0), 0)
  const batchBody = new Encoder(61 + recordsSize)
    .writeInt64(firstOffset)
    .writeInt32(0)
    .writeInt32(partitionLeaderEpoch)
    .writeInt8(MAGIC_BYTE)
    .writeUInt32(0)
  const bodyStart = batchBody.size()
  batchBody
    .writeInt16(attributes)
`,
  },
  {
    files: ["kafkajs/src/protocol/recordBatch/v0/index.js"],
    mark: "/* tide: length and CRC in place */",
    before: `  const batch = new Encoder()
    .writeInt32(partitionLeaderEpoch)
    .writeInt8(MAGIC_BYTE)
    .writeUInt32(crc32C(batchBody.buffer))
    .writeEncoder(batchBody)

  return new Encoder().writeInt64(firstOffset).writeBytes(batch.buffer)
`,
    after: `  /* tide: length and CRC in place */
  batchBody.buf.writeInt32BE(batchBody.size() - 12, 8)
  batchBody.buf.writeUInt32BE(crc32C(batchBody.buf.subarray(bodyStart, batchBody.size())), bodyStart - 4)
  return batchBody
`,
  },
  {
    files: ["kafkajs/src/protocol/recordBatch/crc32C/index.js"],
    mark: "/* tide: crc32c by slices */",
    before: `const unsigned = value => Uint32Array.from([value])[0]

module.exports = buffer => unsigned(crc32C(buffer))
`,
    after: `const unsigned = value => Uint32Array.from([value])[0]
/* tide: crc32c by slices */
const { buf: crc32cBySlices } = require('crc-32/crc32c')

module.exports = buffer => crc32cBySlices(buffer) >>> 0
`,
  },
  {
    files: ["kafkajs/src/protocol/requests/produce/v3/request.js"],
    mark: "/* tide: one buffer per produce request */",
    before: `    return new Encoder()
      .writeString(transactionalId)
      .writeInt16(acks)
      .writeInt32(timeout)
      .writeArray(encodedTopicData)
`,
    after: `    /* tide: one buffer per produce request */
    // Each topic and partition comes as its pieces (a few header bytes, then the record batch),
    // written here once instead of copied into an encoder per level.
    const pieces = encodedTopicData.flat(2)
    const size = pieces.reduce((total, piece) => total + piece.size(), 0)
    const encoder = new Encoder(16 + Buffer.byteLength(transactionalId || '') + size)
      .writeString(transactionalId)
      .writeInt16(acks)
      .writeInt32(timeout)
      .writeInt32(encodedTopicData.length)
    for (const piece of pieces) encoder.writeEncoder(piece)
    return encoder
`,
  },
  {
    files: ["kafkajs/src/protocol/requests/produce/v3/request.js"],
    mark: "/* tide: topic as pieces */",
    before: "  return new Encoder().writeString(topic).writeArray(encodedPartitions)\n",
    after: "  /* tide: topic as pieces */\n  return [new Encoder().writeString(topic).writeInt32(encodedPartitions.length), ...encodedPartitions]\n",
  },
  {
    files: ["kafkajs/src/protocol/requests/produce/v3/request.js"],
    mark: "/* tide: partition as pieces */",
    before: `  return new Encoder()
    .writeInt32(partition)
    .writeInt32(recordBatch.size())
    .writeEncoder(recordBatch)
`,
    after: `  /* tide: partition as pieces */
  return [new Encoder().writeInt32(partition).writeInt32(recordBatch.size()), recordBatch]
`,
  },
  {
    files: ["kafkajs/src/protocol/request.js"],
    mark: "/* tide: one buffer per request */",
    before: `  const requestPayload = new Encoder()
    .writeInt16(apiKey)
    .writeInt16(apiVersion)
    .writeInt32(correlationId)
    .writeString(clientId)
    .writeEncoder(payload)

  return new Encoder().writeInt32(requestPayload.size()).writeEncoder(requestPayload)
`,
    after: `  /* tide: one buffer per request */
  const header = new Encoder()
    .writeInt16(apiKey)
    .writeInt16(apiVersion)
    .writeInt32(correlationId)
    .writeString(clientId)
  return new Encoder(4 + header.size() + payload.size())
    .writeInt32(header.size() + payload.size())
    .writeEncoder(header)
    .writeEncoder(payload)
`,
  },
  {
    files: ["postgres/src/connection.js", "postgres/cjs/src/connection.js", "postgres/cf/src/connection.js"],
    mark: "/* tide: join only the message across chunks */",
    before: `${DATA_HEAD}    }
`,
    after: `${DATA_HEAD}      /* tide: join only the message across chunks */
      // The message needs the first \`take\` bytes of x; the rest of x is parsed in place below.
      const take = remaining + x.length + 1
      if (take <= x.length) {
        incomings[incomings.length - 1] = x.subarray(0, take)
        const message = Buffer.concat(incomings, length + 1)
        incomings = null
        remaining = 0
        try {
          handle(message)
        } catch (e) {
          query && (query.cursorFn || query.describeFirst) && write(Sync)
          errored(e)
        }
        incoming = Buffer.alloc(0)
        x = x.subarray(take)
      }
    }
`,
  },
];

let patched = 0;
for (const patch of PATCHES) {
  for (const file of patch.files.map((f) => join(modules, f))) {
    if (!existsSync(file)) continue;
    const text = readFileSync(file, "utf8");
    if (text.includes(patch.mark)) continue;
    if (!text.includes(patch.before)) {
      console.warn(`patch-deps: ${file} has changed shape; not patched (check whether upstream fixed it)`);
      continue;
    }
    writeFileSync(file, text.replace(patch.before, patch.after));
    patched += 1;
  }
}
if (patched) console.log(`patch-deps: patched ${patched} file(s)`);
