// Publishing on a confirm channel and reading the broker's answers: each message's confirm
// (basic.ack or basic.nack), a deadline for them, and, when the broker closed the channel over a
// publish it refused, which of the unconfirmed messages it was.

import type { ConfirmChannel, Options } from "amqplib";
import type { BrokerReply } from "./connection.ts";
import { messageOf } from "../shared.ts";

/** One message as it goes out. */
export interface Publication {
  exchange: string;
  routingKey: string;
  body: Buffer;
  properties: Options.Publish;
}

/** What became of one published message. */
export type Outcome = { ok: true } | { ok: false; error: unknown };

/** A message amqplib refused to encode (headers over 64 KiB): nothing of it was sent. */
export class EncodeError extends Error {}

/** No confirm came before the deadline. */
export class ConfirmTimeout extends Error {
  constructor() {
    super("no publisher confirm in time");
  }
}

/** Why the broker closed a channel, in its own words: set by the channel's 'error' listener. */
export const channelErrors = new WeakMap<ConfirmChannel, BrokerReply>();

/**
 * Publishes every message in order (waiting when the socket's buffer is full), then waits for each
 * one's confirm until `timeoutMs` after the last was written.
 */
export async function publishConfirmed(ch: ConfirmChannel, publications: Publication[], timeoutMs: number): Promise<Outcome[]> {
  const outcomes: Promise<Outcome>[] = [];
  for (const p of publications) {
    let writable = true;
    outcomes.push(new Promise<Outcome>((resolve) => {
      try {
        writable = ch.publish(p.exchange, p.routingKey, p.body, p.properties, (error) => resolve(error ? { ok: false, error } : { ok: true }));
      } catch (error) {
        // A RangeError: amqplib cannot encode the message (a header table over 64 KiB, a key over
        // 255 bytes); anything else (the channel closed meanwhile) is no fault of the message.
        resolve({ ok: false, error: error instanceof RangeError ? new EncodeError(messageOf(error)) : error });
      }
    }));
    if (!writable) await drained(ch);
  }
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<Outcome>((resolve) => {
    timer = setTimeout(() => resolve({ ok: false, error: new ConfirmTimeout() }), timeoutMs);
  });
  try {
    return await Promise.all(outcomes.map((outcome) => Promise.race([outcome, deadline])));
  } finally {
    clearTimeout(timer);
  }
}

/**
 * The index of the publish the broker refused when it closed the channel: the unconfirmed one its
 * reply names (an exchange, a message size), else the first unconfirmed one; -1 when none is.
 */
export function culpritOf(publications: Publication[], outcomes: Outcome[], reply: BrokerReply): number {
  const unconfirmed = publications.map((_, i) => i).filter((i) => {
    const outcome = outcomes[i]!;
    return !outcome.ok && !(outcome.error instanceof EncodeError);
  });
  const size = /message size (\d+)/i.exec(reply.text)?.[1];
  const named = unconfirmed.find((i) => {
    const p = publications[i]!;
    return size !== undefined ? p.body.length === Number(size) : reply.text.includes(`exchange '${p.exchange}'`);
  });
  return named ?? unconfirmed[0] ?? -1;
}

/** amqplib's error for a message the broker answered with basic.nack. */
export function isNack(error: unknown): boolean {
  return /nack/i.test(messageOf(error));
}

/** Resolves once the channel's write buffer drained, or the channel closed (its confirms then fail). */
function drained(ch: ConfirmChannel): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      ch.off("drain", done);
      ch.off("close", done);
      resolve();
    };
    ch.on("drain", done);
    ch.on("close", done);
  });
}
