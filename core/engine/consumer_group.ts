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

export class ConsumerGroup {
  readonly #sql: Sql;
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
   * they do not exist yet. A pipeline that ran with another number of lanes is refused with the
   * reason (LanesRefused, naming `pipeline`).
   */
  async ensureLanes(baseGroup: string, lanes: number, pipeline: string): Promise<void> {
    try {
      await this.#sql`
        SELECT tide.consumer_lanes_ensure(${this.#outbox}, ${baseGroup}, ${lanes}, ${this.#relayGroupId})`;
    } catch (error) {
      const { code, message, hint } = error as { code?: string; message: string; hint?: string };
      if (code !== "55000") throw error;
      throw new LanesRefused(`pipeline "${pipeline}": ${message}${hint ? `; ${hint}` : ""}`);
    }
  }

  /** The next batch of up to `limit` messages from the group's position; undefined when there is none. */
  async read(limit: number, ownerEpoch: bigint): Promise<Batch | undefined> {
    return batchOf(await this.#sql<FencedRow[]>`
      SELECT id, outbox, topic, payload::text AS payload, headers::text AS headers, created_at, interval_seq, read_cursor, generation
        FROM tide.consumer_read_batch(${this.#outbox}, ${this.#group}, ${limit}, ${this.#relayGroupId}, p_durable := false)`, ownerEpoch);
  }

  /**
   * The batch after `batch`, from the position its acknowledgement will leave, fenced on that
   * position (read-only); undefined when the interval ends with `batch` or anything moved meanwhile.
   */
  async readAhead(batch: Batch, limit: number, ownerEpoch: bigint): Promise<Batch | undefined> {
    const { intervalSeq, generation } = batch.fence;
    const last = batch.messages[batch.messages.length - 1].id;
    return batchOf(await this.#sql<FencedRow[]>`
      SELECT id, outbox, topic, payload::text AS payload, headers::text AS headers, created_at, interval_seq, read_cursor, generation
        FROM tide.consumer_read_ahead(${this.#outbox}, ${this.#group}, ${limit}, ${this.#relayGroupId}, ${intervalSeq}, ${generation}, ${last})`,
      ownerEpoch);
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
    const rows = await this.#sql<(FencedRow & { moved: boolean })[]>`
      SELECT moved, id, outbox, topic, payload::text AS payload, headers::text AS headers, created_at, interval_seq, read_cursor, generation
        FROM tide.consumer_commit_read(${this.#outbox}, ${this.#group}, ${last}, ${count}, ${this.#relayGroupId}, ${fence.generation},
                                       ${fence.intervalSeq}, ${fence.readCursor}, ${fence.ownerEpoch}, ${limit}, p_durable := false)`;
    if (!rows[0].moved) return undefined;
    return batchOf(rows, ownerEpoch) ?? null;
  }
}
