import { test } from "node:test";
import assert from "node:assert/strict";
import { IdWindow, RealtimeAdapter, SupabaseSource, WebSocketSource, backoffDelay, rowToEvent, supabaseHistory } from "../realtime-adapter.js";

class FakeWS {
  static all = [];
  constructor(url) { this.url = url; FakeWS.all.push(this); }
  open() { this.onopen?.(); }
  send(events) { this.onmessage({ data: JSON.stringify({ type: "events", events }) }); }
  close() { this.closed = true; }
  drop() { this.onclose?.(); }
}

function fakeTimers() {
  const pending = [];
  return { pending, setTimeout: (f, ms) => { pending.push({ f, ms }); return pending.length; }, clearTimeout: () => {},
    run() { const p = pending.splice(0); for (const t of p) t.f(); } };
}

function fakeSupabase(rows = []) {
  const sb = { channels: [], removed: 0 };
  sb.channel = (name) => {
    const ch = { name, handlers: [], on(kind, filter, cb) { this.handlers.push({ kind, filter, cb }); return this; },
      subscribe(cb) { this.status = cb; sb.channels.push(this); return this; },
      insert(row) { for (const h of this.handlers) h.cb({ new: row }); } };
    return ch;
  };
  sb.removeChannel = () => { sb.removed++; };
  sb.from = (table) => {
    const q = { table, filters: [], select() { return q; }, gte(c, v) { q.filters.push([c, v]); return q; },
      order(col, opts) { q.order = [col, opts]; return q; }, limit(n) { q.limit = n; return Promise.resolve({ data: rows, error: sb.error ?? null }); } };
    sb.lastQuery = q;
    return q;
  };
  return sb;
}

const ev = (id, ts = 100) => ({ id, name: "m", kind: "gauge", value: 1, ts, tags: {} });
const row = (id, ts = "2024-01-01T00:00:01.500Z") => ({ id, event_type: "m", kind: "gauge", value: 2, timestamp: ts, tags: { a: "b" }, source: "s", agent_id: "a1", session_id: null, data: null });

test("rowToEvent maps monitoring_events columns", () => {
  const e = rowToEvent(row("ABC"));
  assert.equal(e.id, "abc");
  assert.equal(e.name, "m");
  assert.equal(e.ts, Date.parse("2024-01-01T00:00:01.500Z") / 1000);
  assert.deepEqual(e.tags, { a: "b" });
});

test("IdWindow forgets the oldest ids beyond its size", () => {
  const w = new IdWindow(3);
  for (const id of ["a", "b", "c", "d"]) assert.equal(w.add(id), true);
  assert.equal(w.add("d"), false);
  assert.equal(w.has("a"), false);
  assert.equal(w.add("a"), true);
});

test("backoff grows and is capped", () => {
  const d = (n) => backoffDelay(n, { initialMs: 100, maxMs: 1000, random: () => 1 });
  assert.deepEqual([0, 1, 2, 3, 4, 10].map(d), [100, 200, 400, 800, 1000, 1000]);
});

test("websocket mode delivers events and reconnects with a backfill of the gap", async () => {
  FakeWS.all = [];
  const timers = fakeTimers();
  const got = [];
  const fetched = [];
  const fetchImpl = async (url) => {
    fetched.push(url);
    return { ok: true, json: async () => ({ events: [ev("late2", 103), ev("late1", 102), ev("x1", 101)], next: null }) };
  };
  const a = new RealtimeAdapter({ mode: "websocket", wsUrl: "ws://h/api/v1/stream", WebSocketImpl: FakeWS, fetchImpl, timers,
    onEvents: (events, source) => got.push(...events.map((e) => `${source}:${e.id}`)) }).start();
  const ws = FakeWS.all[0];
  ws.open();
  ws.send([ev("x1", 101)]);
  ws.drop();
  assert.equal(timers.pending.length, 1);
  timers.run();
  FakeWS.all[1].open();
  await new Promise((r) => setImmediate(r));
  assert.match(fetched[0], /\/api\/v1\/events\?from=100&limit=1000/);
  assert.deepEqual(got, ["websocket:x1", "websocket:late1", "websocket:late2"]);
  assert.equal(a.stats.duplicates, 1);
  a.stop();
  assert.equal(FakeWS.all[1].closed, true);
});

test("dual mode shows each event once and records which source was first", () => {
  FakeWS.all = [];
  const sb = fakeSupabase();
  const got = [];
  const a = new RealtimeAdapter({ mode: "dual", wsUrl: "ws://h", WebSocketImpl: FakeWS, timers: fakeTimers(), supabase: sb,
    table: "monitoring_events", onEvents: (events) => got.push(...events.map((e) => e.id)) }).start();
  const ws = FakeWS.all[0];
  ws.open();
  const ch = sb.channels[0];
  assert.equal(ch.handlers[0].kind, "postgres_changes");
  assert.deepEqual(ch.handlers[0].filter, { event: "INSERT", schema: "public", table: "monitoring_events" });
  ws.send([ev("a"), ev("b")]);
  ch.insert(row("b"));
  ch.insert(row("c"));
  ws.send([ev("c")]);
  assert.deepEqual(got, ["a", "b", "c"]);
  assert.deepEqual(a.stats.firstBy, { websocket: 2, supabase: 1 });
  assert.equal(a.stats.duplicates, 2);
  a.stop();
  assert.equal(sb.removed, 1);
});

test("supabase mode backfills through PostgREST after a re-subscribe", async () => {
  const sb = fakeSupabase([row("n2", "2024-01-01T00:00:03Z"), row("n1", "2024-01-01T00:00:02Z")]);
  const got = [];
  const a = new RealtimeAdapter({ mode: "supabase", supabase: sb, table: "t", onEvents: (events) => got.push(...events.map((e) => e.id)) }).start();
  const ch = sb.channels[0];
  ch.status("SUBSCRIBED");
  ch.insert(row("n0", "2024-01-01T00:00:01Z"));
  ch.status("CHANNEL_ERROR");
  assert.equal(a.status.supabase.state, "reconnecting");
  ch.status("SUBSCRIBED");
  await new Promise((r) => setImmediate(r));
  assert.equal(sb.lastQuery.table, "t");
  assert.equal(sb.lastQuery.filters[0][0], "timestamp");
  assert.deepEqual(got, ["n0", "n1", "n2"]);
});

test("a Supabase mode without a client is refused with a clear message", () => {
  assert.throws(() => new RealtimeAdapter({ mode: "supabase" }), /needs a Supabase client/);
  assert.throws(() => new RealtimeAdapter({ mode: "carrier-pigeon" }), /unknown data source/);
});

test("after a live switch the new source backfills the gap on its first connect", async () => {
  FakeWS.all = [];
  const urls = [];
  const fetchImpl = async (url) => { urls.push(url); return { ok: true, json: async () => ({ events: [ev("gap", 500)], next: null }) }; };
  const got = [];
  const a = new RealtimeAdapter({ mode: "websocket", wsUrl: "ws://x/api/v1/stream", WebSocketImpl: FakeWS, fetchImpl,
    timers: fakeTimers(), onEvents: (events) => got.push(...events.map((e) => e.id)) });
  a.resumeFrom(499).start();
  FakeWS.all[0].open();
  await new Promise((r) => setTimeout(r, 0));
  assert.equal(urls.length, 1);
  assert.match(urls[0], /from=498/);
  assert.deepEqual(got, ["gap"]);
});

test("a first connect without a switch does not backfill", async () => {
  FakeWS.all = [];
  const urls = [];
  const a = new RealtimeAdapter({ mode: "websocket", wsUrl: "ws://x", WebSocketImpl: FakeWS,
    fetchImpl: async (u) => { urls.push(u); return { ok: true, json: async () => ({ events: [] }) }; },
    timers: fakeTimers(), onEvents: () => {} });
  a.start();
  FakeWS.all[0].open();
  await new Promise((r) => setTimeout(r, 0));
  assert.equal(urls.length, 0);
});

test("a successor adapter sharing the seen window drops what its predecessor showed", () => {
  FakeWS.all = [];
  const got = [];
  const onEvents = (events) => got.push(...events.map((e) => e.id));
  const first = new RealtimeAdapter({ mode: "websocket", wsUrl: "ws://x", WebSocketImpl: FakeWS, timers: fakeTimers(), onEvents }).start();
  FakeWS.all[0].open();
  FakeWS.all[0].send([ev("a"), ev("b")]);
  const next = new RealtimeAdapter({ mode: "websocket", seen: first.seen, wsUrl: "ws://x", WebSocketImpl: FakeWS, timers: fakeTimers(), onEvents }).start();
  assert.equal(next.isLive(), false);
  FakeWS.all[1].open();
  assert.equal(next.isLive(), true);
  FakeWS.all[1].send([ev("b"), ev("c")]);
  FakeWS.all[0].send([ev("c")]);
  assert.deepEqual(got, ["a", "b", "c"]);
});

test("one Supabase history query: the newest rows, optionally since a time, as events", async () => {
  const sb = fakeSupabase([row("n2", "2024-01-01T00:00:03Z"), row("n1", "2024-01-01T00:00:02Z")]);
  const newest = await supabaseHistory(sb, "t", { limit: 50 });
  assert.deepEqual(newest.map((e) => e.id), ["n2", "n1"]);
  assert.equal(sb.lastQuery.table, "t");
  assert.deepEqual(sb.lastQuery.filters, []);
  assert.deepEqual(sb.lastQuery.order, ["timestamp", { ascending: false }]);
  assert.equal(sb.lastQuery.limit, 50);
  await supabaseHistory(sb, "t", { since: 1704067200 });
  assert.deepEqual(sb.lastQuery.filters, [["timestamp", "2024-01-01T00:00:00.000Z"]]);
  sb.error = { message: "permission denied" };
  await assert.rejects(supabaseHistory(sb, "t"), /permission denied/);
});

test("both sources deliver through one _deliver that tracks the newest event time", () => {
  assert.equal(WebSocketSource.prototype._deliver, SupabaseSource.prototype._deliver);
  const got = [];
  const s = new SupabaseSource({ client: fakeSupabase(), onEvents: (events, source) => got.push([source, events.length]) });
  s._deliver([ev("a", 5), ev("b", 7), ev("c", 6)]);
  assert.equal(s.lastTs, 7);
  assert.deepEqual(got, [["supabase", 3]]);
});
