// JetStream publishes with their PubAcks collected on one subscription: each message goes out as a
// plain PUB whose reply subject is `<inbox>.<n>`, and the stream's PubAck (or its error) comes back
// there. jetstream().publish() makes a request per message instead (its own timer, mux entry and
// error objects for stack traces), which made a backlog drain spend most of the relay's CPU in the
// client. Here a message in flight costs one map entry, and a batch one timer. At most
// MAX_PENDING_ACKS messages wait for their PubAck at a time.

import { createInbox, type MsgHdrs, type NatsConnection, PermissionViolationError, type Subscription } from "@nats-io/transport-node";

/** Messages sent and still waiting for their PubAck, at most. */
export const MAX_PENDING_ACKS = 1024;

export interface Outgoing {
  subject: string;
  data: Uint8Array;
  headers: MsgHdrs;
  /** False: a core NATS publish, sent in its place in the order, not waited for (flush it). */
  ack: boolean;
}

interface Pending {
  subject: string;
  index: number;
  results: (Error | undefined)[];
  settled(): void;
}

export class JetStreamPublisher {
  readonly #nc: NatsConnection;
  readonly #prefix: string;
  readonly #pending = new Map<string, Pending>();
  readonly #decoder = new TextDecoder();
  #subscription: Subscription | undefined;
  #next = 0;
  /** Resolved when a PubAck arrives: a sender waiting for room in the window goes on. */
  #room: { promise: Promise<void>; resolve: () => void } | undefined;

  constructor(nc: NatsConnection) {
    this.#nc = nc;
    this.#prefix = `${createInbox()}.`;
    void this.#watchDenials();
  }

  /**
   * Publishes every message, in order; resolves once each that asks for one has its PubAck or
   * `timeoutMs` has passed, with one entry per message: undefined when the stream stored it (or
   * already had its Nats-Msg-Id) or a core message was handed to the connection, else why not.
   */
  async publishAll(messages: Outgoing[], timeoutMs: number): Promise<(Error | undefined)[]> {
    const results: (Error | undefined)[] = new Array(messages.length);
    if (messages.length === 0) return results;
    this.#subscription ??= this.#nc.subscribe(`${this.#prefix}*`, { callback: (error, msg) => this.#settle(error, msg) });
    const done = Promise.withResolvers<void>();
    let waiting = messages.length;
    const settled = () => {
      if (--waiting === 0) done.resolve();
    };
    let timer: ReturnType<typeof setTimeout> | undefined;
    let late = false;
    const deadline = new Promise<void>((resolve) => (timer = setTimeout(() => resolve(void (late = true)), timeoutMs)));
    const sent: string[] = [];
    try {
      for (let index = 0; index < messages.length; index++) {
        while (this.#pending.size >= MAX_PENDING_ACKS && !late) {
          this.#room ??= Promise.withResolvers<void>();
          await Promise.race([this.#room.promise, deadline]);
        }
        if (late) {
          results[index] = new Error(`not sent: ${MAX_PENDING_ACKS} messages before it got no PubAck within ${timeoutMs} ms`);
          continue;
        }
        const { subject, data, headers, ack } = messages[index]!;
        const token = String(this.#next++);
        try {
          this.#nc.publish(subject, data, ack ? { reply: this.#prefix + token, headers } : { headers });
        } catch (error) {
          results[index] = error instanceof Error ? error : new Error(String(error));
          settled();
          continue;
        }
        if (!ack) {
          settled();
          continue;
        }
        this.#pending.set(token, { subject, index, results, settled });
        sent.push(token);
      }
      await Promise.race([done.promise, deadline]);
    } finally {
      clearTimeout(timer);
    }
    for (const token of sent) {
      const pending = this.#pending.get(token);
      if (!pending) continue;
      this.#pending.delete(token);
      results[pending.index] = new Error(`no PubAck within ${timeoutMs} ms`);
    }
    return results;
  }

  close(): void {
    this.#subscription?.unsubscribe();
    this.#subscription = undefined;
    for (const [token, pending] of this.#pending) this.#fail(token, pending, new Error("the connection was closed"));
  }

  #settle(error: Error | null, msg: { subject: string; data: Uint8Array; headers?: MsgHdrs }): void {
    if (error) {
      // The subscription itself failed (e.g. no permission on the inbox): nothing will be acknowledged.
      for (const [token, pending] of this.#pending) this.#fail(token, pending, error);
      return;
    }
    const token = msg.subject.slice(this.#prefix.length);
    const pending = this.#pending.get(token);
    if (!pending) return; // after its deadline
    this.#pending.delete(token);
    pending.results[pending.index] = ackError(msg, this.#decoder);
    pending.settled();
    this.#room?.resolve();
    this.#room = undefined;
  }

  #fail(token: string, pending: Pending, error: Error): void {
    this.#pending.delete(token);
    pending.results[pending.index] = error;
    pending.settled();
    this.#room?.resolve();
    this.#room = undefined;
  }

  /**
   * A PUB the user may not send is dropped by the server, which says so only in an asynchronous
   * -ERR: every message waiting for a PubAck on that subject has failed.
   */
  async #watchDenials(): Promise<void> {
    try {
      for await (const status of this.#nc.status()) {
        if (status.type !== "error" || !(status.error instanceof PermissionViolationError)) continue;
        const denied = status.error;
        if (denied.operation !== "publish") continue;
        for (const [token, pending] of this.#pending) if (pending.subject === denied.subject) this.#fail(token, pending, denied);
      }
    } catch {
      // The iterator ends with the connection.
    }
  }
}

/** Undefined for a PubAck; the stream's error, or "no responders" (no stream stores the subject). */
function ackError(msg: { data: Uint8Array; headers?: MsgHdrs }, decoder: TextDecoder): Error | undefined {
  if (msg.headers?.code === 503) return new Error("no responders: no JetStream stream stores the subject any more");
  let answer: { stream?: string; error?: { code?: number; description?: string } };
  try {
    answer = JSON.parse(decoder.decode(msg.data));
  } catch {
    return new Error(`an answer that is not a PubAck: ${decoder.decode(msg.data).slice(0, 200)}`);
  }
  if (answer.error) return new Error(`${answer.error.description ?? "the stream refused the message"} (${answer.error.code ?? "?"})`);
  if (!answer.stream) return new Error("an invalid PubAck (no stream)");
  return undefined;
}
