// The statements a forward worker runs on its consumer group, each one tide.consumer_* SQL
// function: claiming the group, creating a pipeline's lane groups, reading a batch, reading the
// next one ahead, and the acknowledgement, a compare-and-set on the fence the batch was read under
// (with or without the read of the next batch in the same round trip). It decides nothing: when to
// read and whether to acknowledge is core/engine/forward.ts's.
//
// Reads and commits pass p_durable := false: a commit does not wait for a disk flush; only a crash of
// the server can then take the position back a little, and what it covered is delivered again (sql/002).

import type { Sql } from "../db.ts";
import { batchOf, type Batch, type Fence, type FencedRow } from "./forward_batch.ts";

/** The pipeline's lane groups were made for another number of lanes: tide.consumer_lanes_ensure refused. */
export class LanesRefused extends Error {}

/** The lane a group is read as when the database filters it (tide.lane_filter): `key` is the lane key's path. */
export interface LaneFilter {
  lane: number;
  lanes: number;
  key: string[];
}

// A read's rows all carry the fence they were read under (and the outbox, which is this group's):
// only the first row's fence is sent, the others' are NULL (three bigints a message less to decode
// while draining). Reads are raw: every column arrives as the bytes of its text, and fencedRows
// decodes all but the payload, which stays bytes (OutboxMessage.payloadBytes).
const MESSAGE_COLUMNS = "id, topic, payload::text AS payload, headers::text AS headers, created_at, " +
  "CASE WHEN n = 1 THEN interval_seq END AS interval_seq, CASE WHEN n = 1 THEN read_cursor END AS read_cursor, " +
  "CASE WHEN n = 1 THEN generation END AS generation";
const READ_COLUMNS = "id, outbox, topic, payload, headers, created_at, interval_seq, read_cursor, generation, n";

export class ConsumerGroup {
  readonly #sql: Sql;
  /** JSON of the LaneFilter every read passes (p_lane), or null: the group is not read as a lane by the database. */
  #lane: string | null = null;
  readonly #outbox: string;
  readonly #group: string;
  readonly #relayGroupId: string;

  constructor(sql: Sql, outbox: string, group: string, relayGroupId: string) {
    this.#sql = sql;
    this.#outbox = outbox;
    this.#group = group;
    this.#relayGroupId = relayGroupId;
  }

  /** Takes the group over: from now on a former owner's acknowledgements are refused. The new owner epoch. */
  async claim(): Promise<bigint> {
    const [{ epoch }] = await this.#sql<{ epoch: bigint }[]>`
      SELECT tide.consumer_claim(${this.#outbox}, ${this.#group}, ${this.#relayGroupId}) AS epoch`;
    return epoch;
  }

  /**
   * Creates the lanes' consumer groups (all at once, at the position of `baseGroup`, lane 0's) when
   * they do not exist yet, and records the lane each is read as. A pipeline that ran with another
   * number of lanes or another lane key is refused with the reason (LanesRefused, naming
   * `pipeline`). True when the database reads this group as `lane` (only the lane's messages come
   * back); false for one lane, and for lanes made before schema version 15, whose reads return every
   * message for the relay to pick its lane's.
   */
  async prepareLanes(baseGroup: string, lane: LaneFilter, pipeline: string): Promise<boolean> {
    let inDatabase: boolean;
    try {
      [{ inDatabase }] = await this.#sql<{ inDatabase: boolean }[]>`
        SELECT tide.consumer_lanes_prepare(${this.#outbox}, ${baseGroup}, ${lane.lanes}, ${this.#relayGroupId},
                                           ${lane.key.join(".")}) AS "inDatabase"`;
    } catch (error) {
      const { code, message, hint } = error as { code?: string; message: string; hint?: string };
      if (code !== "55000") throw error;
      throw new LanesRefused(`pipeline "${pipeline}": ${message}${hint ? `; ${hint}` : ""}`);
    }
    this.#lane = inDatabase ? JSON.stringify(lane) : null;
    return inDatabase;
  }

  /** The next batch of up to `limit` messages from the group's position; undefined when there is none. */
  async read(limit: number, ownerEpoch: bigint): Promise<Batch | undefined> {
    const raw = await this.#sql`
      SELECT ${this.#sql.unsafe(MESSAGE_COLUMNS)}
        FROM tide.consumer_read_batch(${this.#outbox}, ${this.#group}, ${limit}, ${this.#relayGroupId}, p_durable := false,
                                       p_lane := ${this.#lane}::text::jsonb) WITH ORDINALITY AS r(${this.#sql.unsafe(READ_COLUMNS)})`.raw();
    return batchOf(fencedRows(raw, 0), ownerEpoch, this.#outbox);
  }

  /**
   * The batch after `batch`, from the position its acknowledgement will leave, fenced on that
   * position (read-only); undefined when the interval ends with `batch` or anything moved meanwhile.
   */
  async readAhead(batch: Batch, limit: number, ownerEpoch: bigint): Promise<Batch | undefined> {
    const { intervalSeq, generation } = batch.fence;
    const last = batch.messages[batch.messages.length - 1].id;
    const raw = await this.#sql`
      SELECT ${this.#sql.unsafe(MESSAGE_COLUMNS)}
        FROM tide.consumer_read_ahead(${this.#outbox}, ${this.#group}, ${limit}, ${this.#relayGroupId}, ${intervalSeq}, ${generation}, ${last},
                                       p_lane := ${this.#lane}::text::jsonb) WITH ORDINALITY AS r(${this.#sql.unsafe(READ_COLUMNS)})`.raw();
    return batchOf(fencedRows(raw, 0), ownerEpoch, this.#outbox);
  }

  /**
   * Moves the position past `last` (`count` messages) on `sql` (the pool, or a transaction), unless
   * anything in `fence` moved since the batch was read. True when the position moved.
   */
  async commit(sql: Sql, last: bigint, count: number, fence: Fence): Promise<boolean> {
    const [{ moved }] = await sql<{ moved: boolean }[]>`
      SELECT tide.consumer_commit(${this.#outbox}, ${this.#group}, ${last}, ${count},
                                  ${this.#relayGroupId}, ${fence.generation}, ${fence.intervalSeq},
                                  ${fence.readCursor}, ${fence.ownerEpoch}, p_durable := false) AS moved`;
    return moved;
  }

  /**
   * The commit, and when it moved the position, the read of the next batch of up to `limit`: one
   * round trip. Undefined when the commit was refused; else the next batch, null for none.
   */
  async commitAndRead(last: bigint, count: number, fence: Fence, limit: number, ownerEpoch: bigint): Promise<Batch | null | undefined> {
    const raw = await this.#sql`
      SELECT moved, ${this.#sql.unsafe(MESSAGE_COLUMNS)}
        FROM tide.consumer_commit_read(${this.#outbox}, ${this.#group}, ${last}, ${count}, ${this.#relayGroupId}, ${fence.generation},
                                       ${fence.intervalSeq}, ${fence.readCursor}, ${fence.ownerEpoch}, ${limit}, p_durable := false,
                                       p_lane := ${this.#lane}::text::jsonb) WITH ORDINALITY AS r(moved, ${this.#sql.unsafe(READ_COLUMNS)})`.raw();
    if (!isTrue(raw[0][0])) return undefined;
    return batchOf(fencedRows(raw, 1), ownerEpoch, this.#outbox) ?? null;
  }
}

/** A column as the server sent it: the bytes of its text (the driver's raw reads), or null. */
type RawColumn = Buffer | null;

/**
 * The rows of a raw read whose MESSAGE_COLUMNS start at column `from`. The message columns are the
 * text the driver would decode (int8, text, timestamptz as `2026-01-02 03:04:05.678+00`, which
 * `new Date` reads as the driver does); the payload is kept as it arrived.
 */
export function fencedRows(raw: RawColumn[][], from: number): FencedRow[] {
  const rows: FencedRow[] = new Array(raw.length);
  for (let i = 0; i < raw.length; i++) {
    const r = raw[i];
    // A read that found nothing returns one row of NULLs (batchOf looks at its id).
    rows[i] = {
      id: bigintOf(r[from])!,
      topic: textOf(r[from + 1]),
      payload: r[from + 2] ?? EMPTY,
      headers: textOf(r[from + 3]),
      created_at: new Date(asciiOf(r[from + 4]) ?? 0),
      interval_seq: bigintOf(r[from + 5]),
      read_cursor: bigintOf(r[from + 6]),
      generation: bigintOf(r[from + 7]),
    };
  }
  return rows;
}

const EMPTY = Buffer.alloc(0);
const textOf = (column: RawColumn): string | null => (column === null ? null : column.toString("utf8"));
/** An int8 or timestamptz: its text is ASCII. */
const asciiOf = (column: RawColumn): string | null => (column === null ? null : column.toString("latin1"));
const bigintOf = (column: RawColumn): bigint | null => (column === null ? null : BigInt(asciiOf(column)!));
/** A boolean's text: `t` or `f`. */
const isTrue = (column: RawColumn | undefined): boolean => column?.[0] === 0x74;
