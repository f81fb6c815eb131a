// Type declarations for dbfeed-client (index.js). Checked by `tsc --noEmit` in the tests.
import type { Socket, SocketOptions, ManagerOptions } from "socket.io-client";

/** A value as the library hands it out: `bigint` only with `bigNumbers: "bigint"`. */
export type Json = null | boolean | number | bigint | string | Json[] | { [key: string]: Json };

/**
 * How a number a double would change (an integer past ±(2^53 - 1), such as a `bigint`
 * snowflake id; a decimal with more digits than a double keeps) reaches the application:
 * "string" (default) its exact text, `"9007199254740993"`; "bigint" an integer as a BigInt,
 * `9007199254740993n` (a decimal as its text); "number" as JSON.parse reads it, rounded
 * (`9007199254740992`: another row's id). Smaller numbers are numbers in every mode.
 */
export type BigNumbers = "string" | "bigint" | "number";
export type Row = { [field: string]: Json };

/** One change, as the server sends it (docs/protocol.md). */
export interface Change {
  id: string;
  room: string;
  seq: number;
  connector: string;
  source: string;
  target: string;
  op: string;
  key: Json;
  before: Row | null;
  after: Row | null;
  ts: string;
  meta?: { [key: string]: Json };
  /** Set when a filter room delivers a change whose after image no longer matches. */
  left?: true;
}

export interface Status {
  connector: string;
  state: "up" | "down" | "lagging" | "starting" | "stopped";
  detail: string;
  since: string;
  /** In a cluster, to operators: the node that reads the connector (null while none does). */
  reader?: string | null;
}

export interface Gap {
  connector: string;
  room: string;
  target: string;
  reason: string;
  /** The room's position as of the gap: its next change is `seq + 1`... */
  seq: number;
  /** ...in this epoch (a new one when a cluster's Redis lost the room's history). */
  epoch?: string | null;
  ts?: string | null;
}

export type State = "pending" | "live" | "recovered" | "reload" | "error";

export interface StateInfo {
  /** recovered: how many changes the server replays. */
  replayed?: number;
  /** reload: why data may have been missed; pending: why we wait. */
  reason?: string;
  /** pending: whether the subscribe resumes from the last seq. */
  resuming?: boolean;
  /** error: the server's code and message. */
  code?: string;
  message?: string;
}

export type Token = string | (() => string | null | Promise<string | null>);

export interface FeedClientOptions {
  /** A token, or a function returning the current one (called on every connect and refresh;
   * one that throws is an `error` `token_failed`, and the attempt is retried with backoff). */
  token?: Token;
  /** Refresh a function token's JWT before it expires (default true). */
  refreshTokens?: boolean;
  /** With a function token, or a refusal that says "not now" (`too_many_connections`,
   * `auth_unavailable`, `server_busy`): retry a refused connection with backoff (default true;
   * a "not now" refusal at the next node at once when several are given);
   * when false, wait for `reconnect()`. A fixed token's other refusals, and `handshake_refused`
   * whatever the token, end every subscription (docs/clients.md, "Refused connections"). */
  retryRefused?: boolean;
  /** Socket.IO path (default "/socket.io/"). */
  path?: string;
  transports?: ("websocket" | "polling" | "webtransport")[];
  reconnectionDelay?: number;
  reconnectionDelayMax?: number;
  /** Milliseconds to wait for an answer to a request, and for a connection attempt before the
   * next node is tried (default 10000; `socketOptions.timeout` overrides the latter). */
  timeout?: number;
  /** Numbers a double would change: their text (default), BigInt, or rounded (see `BigNumbers`). */
  bigNumbers?: BigNumbers;
  /** Any other socket.io-client options. */
  socketOptions?: Partial<ManagerOptions & SocketOptions>;
  /** The socket.io-client `io` function to use (default: the one imported). */
  io?: (url: string, options: Partial<ManagerOptions & SocketOptions>) => Socket;
}

export interface SubscribeOptions {
  /** A PostgREST-style filter: `status=eq.paid&amount=gt.100`. */
  filter?: string;
  /** Start with the current rows, and keep `rows` up to date. */
  snapshot?: boolean;
  /**
   * Only for servers older than snapshot keys (whose acks carry no `snapshot_keys`): how to read
   * a snapshot row's key, a field, fields (a composite key), or a function. A current server
   * sends each row's key, and that is used instead.
   */
  key?: string | string[] | ((row: Row) => Json);
  /**
   * At most this many changes wait for a `for await` loop (default 10000) when a frame of
   * changes arrives; then a reload. A frame is taken whole (docs/clients.md, "A slow consumer").
   */
  maxQueue?: number;
  /**
   * Resume from a position saved earlier (`sub.seq` and `sub.epoch`): `since` without `epoch`
   * throws. Null, as `sub.seq` and `sub.epoch` are before the first answer, means none.
   */
  since?: number | null;
  epoch?: string | null;
}

export interface SnapshotInfo {
  truncated: boolean;
  rows: Map<string, Row>;
}

export interface CatalogAnswer {
  ok: true;
  epoch: string;
  /** `reader`: in a cluster, to operators, the node that reads the connector. */
  connectors: { name: string; type: string; status: Status; targets: string[]; reader?: string | null }[];
  unconfigured: { type: string; detail: string }[];
}

/** The wait before the library's own retry number `attempt` (0, 1, ...): doubling from
 * `reconnectionDelay` up to `reconnectionDelayMax`, spread by ±50% at random. */
export function retryDelay(
  attempt: number,
  options?: { reconnectionDelay?: number; reconnectionDelayMax?: number },
): number;

/**
 * The codes the library gives a connection's `error` itself (docs/clients.md, "Refused
 * connections"): `handshake_refused` (HTTP 400/403: the name the feed is reached by, or the
 * page's origin; final), `server_busy` (HTTP 503: the server at its connection limit; retried),
 * `too_large` (a token, or a request, over the server's `max_message_bytes`: not sent),
 * `unreachable` (no connection for `timeout`, no refusal that could be read; once per outage,
 * still trying), `token_failed` (the token function threw). Any other code is the server's.
 */
export type ClientErrorCode = "handshake_refused" | "server_busy" | "too_large" | "unreachable" | "token_failed";

export class FeedError extends Error {
  constructor(code: string, message: string, data?: unknown);
  /** A `ClientErrorCode`, `timeout`, `closed`, `not_connected`, or the server's code. */
  readonly code: ClientErrorCode | (string & {});
  /** `too_large` (a request or token larger than the server takes in one message, not sent):
   * `{ code, size, limit }`, in bytes. */
  readonly data?: unknown;
  /** Set on the error of a connection the server refused (its `data.code` says why; for a
   * refusal in HTTP, `handshake_refused`, `too_large` or `server_busy`, `data.status` too). */
  readonly refused?: boolean;
}

/** The row key as in row room names: `42`, `abc`, `7,2`; null when there is none. */
export function keyText(key: Json | undefined): string | null;
/** A JSON text read as JSON.parse reads it, but numbers a double would change kept exact, per `mode` ("string" by default). Every frame from the server is read so. */
export function parseFrame(text: string, mode?: BigNumbers): Json;
/** A copy of a row with a MongoDB update description applied (updatedFields, removedFields, truncatedArrays). */
export function patched(row: Row, description: { [key: string]: Json }): Row;

export class FeedClient {
  /** One URL, or the nodes of one feed (a cluster), tried in turn: after a failed attempt or a
   * lost connection the next is tried, the backoff once a round of them all failed. */
  constructor(url: string | string[], options?: FeedClientOptions);
  /** The node connected to (or being tried). */
  readonly url: string;
  readonly urls: string[];
  /** `options.bigNumbers`, "string" when not given. */
  readonly bigNumbers: BigNumbers;
  readonly socket: Socket;
  readonly connected: boolean;
  readonly subscriptions: Set<Subscription>;
  subscribe(room: string, options?: SubscribeOptions): Subscription;
  catalog(): Promise<CatalogAnswer>;
  refresh(token?: string): Promise<{ ok: true; expires_in: number | null }>;
  /** Connect again now (after a new token, say); `force` drops a live connection first. */
  reconnect(force?: boolean): void;
  close(): void;
  on(event: "connect", fn: () => void): this;
  on(event: "disconnect", fn: (reason: string) => void): this;
  /** A refused or failed connection (`refused`, a `ClientErrorCode` or the server's code), or a
   * failed refresh. */
  on(event: "error", fn: (error: FeedError) => void): this;
  on(event: "status", fn: (status: Status) => void): this;
  on(event: "gap", fn: (gap: Gap) => void): this;
  on(event: "handler_error", fn: (error: unknown, event: string) => void): this;
  off(event: string, fn: (...args: any[]) => void): this;
}

export class Subscription {
  readonly client: FeedClient;
  /** The room as asked for. */
  readonly requested: string;
  readonly filter: string | null;
  readonly snapshot: boolean;
  /** The canonical room name from the server (null until the first answer). */
  readonly room: string | null;
  readonly state: State;
  /** The last seq delivered, and the server run it belongs to: save both to resume later. */
  readonly seq: number | null;
  readonly epoch: string | null;
  /** With `snapshot`: row key (as in row room names) -> current row; otherwise null. */
  readonly rows: Map<string, Row> | null;
  /** Whether the last snapshot stopped at the server's `snapshot_limit`. */
  readonly truncated: boolean;
  /** The most changes that wait for a `for await` loop before it is told to reload. */
  readonly maxQueue: number;
  /** The changes one at a time, as fast as the loop takes them (see `maxQueue`). */
  [Symbol.asyncIterator](): AsyncIterator<Change>;
  /** Resolves on the first successful answer; rejects with a FeedError when refused. */
  readonly ready: Promise<Subscription>;
  unsubscribe(): Promise<void>;
  /** Start afresh: a new subscribe without `since`, with a new snapshot. */
  reload(reason?: string): void;
  on(event: "snapshot", fn: (rows: Row[], info: SnapshotInfo) => void): this;
  on(event: "change", fn: (change: Change) => void): this;
  on(event: "state", fn: (state: State, info: StateInfo) => void): this;
  on(event: "error", fn: (error: FeedError) => void): this;
  on(event: "handler_error", fn: (error: unknown, event: string) => void): this;
  off(event: string, fn: (...args: any[]) => void): this;
}
