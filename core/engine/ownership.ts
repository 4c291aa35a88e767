// The relay's ownership lock session: a connection of its own, outside the pool, whose session
// advisory locks are the units this relay owns (core/engine/coordinator.ts takes and releases them). Its
// backend pid is recorded when it connects; verifying asks the session for its pid and for the locks
// of every owned unit. A different pid means the session died and the client reconnected: the locks
// are gone. Any doubt (another pid, a missing lock, no answer in time) is reported to the owner's
// `lost` callback, which fences its workers and closes the session; the next open() starts afresh.

import { connect, type Sql } from "../db.ts";
import { toError } from "../errors.ts";
import { TIMED_OUT, within } from "./backoff.ts";

/** A lock connection that does not answer this fast is treated as lost. */
export const LOCK_CHECK_TIMEOUT_MS = 5_000;

/** The application_name of a relay's lock session: how relays of a relay group count each other. */
export function ownershipApplicationName(relayGroupId: string): string {
  return `pg-tide ownership ${relayGroupId}`;
}

export interface LockSessionOptions {
  postgresUrl?: string;
  relayGroupId: string;
  /** The keys of the units this relay owns now: their locks must be held. */
  owned: () => string[];
  /** The session is lost or in doubt, for `problem`: fence every worker, then close() the session. */
  lost: (problem: string) => Promise<void>;
}

/** The dedicated lock session: its own client, and the backend pid that holds the locks. */
interface Session {
  sql: Sql;
  pid: number;
}

export class LockSession {
  readonly #options: LockSessionOptions;
  #session: Session | undefined;
  /** The verification in progress, shared by everyone asking at the same moment. */
  #verifying: Promise<boolean> | undefined;

  constructor(options: LockSessionOptions) {
    this.#options = options;
  }

  /** The client of the current session; undefined when there is none. */
  get sql(): Sql | undefined {
    return this.#session?.sql;
  }

  /** The verified lock session, or a new one (with no locks) when there was none or it was lost. */
  async open(): Promise<Sql> {
    if (this.#session && (await this.verify())) return this.#session.sql;
    if (this.#session) await this.#options.lost("the ownership session could not be verified");
    if (!this.#options.postgresUrl) throw new Error("the coordinator needs postgresUrl for its ownership session");
    const sql = connect(this.#options.postgresUrl, {
      max: 1,
      keepAlive: true,
      applicationName: ownershipApplicationName(this.#options.relayGroupId),
    });
    try {
      const [{ pid }] = await sql<{ pid: number }[]>`SELECT pg_backend_pid() AS pid`;
      this.#session = { sql, pid };
    } catch (error) {
      await sql.end({ timeout: 0 }).catch(() => {});
      throw error;
    }
    return sql;
  }

  /**
   * Asks the lock session for its pid and for the locks of every owned unit. False, after reporting
   * it lost, when the session is another one (it died and the client reconnected), a lock is
   * missing, or the session does not answer in time.
   */
  verify(): Promise<boolean> {
    this.#verifying ??= (async () => {
      const session = this.#session;
      const names = this.#options.owned();
      if (!session) {
        if (names.length === 0) return true;
        await this.#options.lost("no ownership session");
        return false;
      }
      let problem: string | undefined;
      try {
        const answer = await within(session.sql<{ pid: number; missing: string[] }[]>`
          SELECT pg_backend_pid() AS pid,
                 array(SELECT n FROM unnest(${names}::text[]) n
                        WHERE NOT EXISTS (
                          SELECT 1 FROM pg_locks l
                           WHERE l.pid = pg_backend_pid() AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                             AND l.classid::integer = hashtext(${this.#options.relayGroupId})
                             AND l.objid::integer = hashtext(n))) AS missing`, LOCK_CHECK_TIMEOUT_MS);
        if (answer === TIMED_OUT) problem = `the ownership session did not answer within ${LOCK_CHECK_TIMEOUT_MS} ms`;
        else if (answer[0].pid !== session.pid) problem = `the ownership session ended (backend ${session.pid}); its locks are gone`;
        else if (answer[0].missing.length > 0) problem = `the locks of ${answer[0].missing.join(", ")} are no longer held`;
      } catch (error) {
        problem = `the ownership session failed: ${toError(error).message}`;
      }
      if (problem === undefined) return true;
      if (this.#session === session) await this.#options.lost(problem);
      return false;
    })().finally(() => (this.#verifying = undefined));
    return this.#verifying;
  }

  /** Ends the session: every lock it held is released at once. */
  async close(): Promise<void> {
    const session = this.#session;
    this.#session = undefined;
    await session?.sql.end({ timeout: 0 }).catch(() => {});
  }
}
