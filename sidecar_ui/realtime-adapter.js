// One live-event interface over three sources: the agent's WebSocket, Supabase Realtime
// (postgres_changes INSERT + history via PostgREST), or both ("dual", de-duplicated by
// event id, counting which source delivered each event first).
// No DOM access: WebSocket, fetch, timers and the Supabase client are injected, so the
// module runs under `node --test`.

export const MODES = ["websocket", "supabase", "dual"];
const DEDUP_WINDOW = 50000;

// A row of monitoring_events (see agent/sql/monitoring_events.sql) as an agent Event.
export function rowToEvent(row) {
  return {
    id: String(row.id).toLowerCase(),
    name: row.event_type,
    kind: row.kind,
    value: row.value == null ? null : Number(row.value),
    ts: typeof row.timestamp === "number" ? row.timestamp : Date.parse(row.timestamp) / 1000,
    tags: row.tags || {},
    source: row.source || "",
    agent_id: row.agent_id || "",
    session_id: row.session_id ?? null,
    data: row.data ?? null,
  };
}

// Remembers the last `size` ids; `add` is true the first time an id is seen.
export class IdWindow {
  constructor(size = DEDUP_WINDOW) { this.size = size; this.set = new Set(); this.order = []; this.head = 0; }
  has(id) { return this.set.has(id); }
  add(id) {
    if (this.set.has(id)) return false;
    this.set.add(id);
    this.order.push(id);
    if (this.order.length - this.head > this.size) {
      this.set.delete(this.order[this.head++]);
      if (this.head > this.size) { this.order = this.order.slice(this.head); this.head = 0; }
    }
    return true;
  }
}

// Exponential backoff with full jitter: initial, 2x, ... capped at max.
export function backoffDelay(attempt, { initialMs = 250, maxMs = 10000, random = Math.random } = {}) {
  const cap = Math.min(maxMs, initialMs * 2 ** attempt);
  return Math.round(cap / 2 + random() * cap / 2);
}

// The newest `limit` rows of the Supabase events table (only those since `since`, in
// seconds, when given) as agent Events, newest first: the page's first history load and
// the Realtime source's backfill both read history through this one query.
export async function supabaseHistory(client, table, { since = null, limit = 1000 } = {}) {
  let query = client.from(table).select("*");
  if (since != null) query = query.gte("timestamp", new Date(since * 1000).toISOString());
  const { data, error } = await query.order("timestamp", { ascending: false }).limit(limit);
  if (error) throw new Error(error.message);
  return (data || []).map(rowToEvent);
}

// What every source shares: it remembers the newest event time it delivered, and once
// (re)connected after a drop or a live switch it backfills history from there.
class Source {
  constructor(name, onEvents, onStatus) {
    Object.assign(this, { name, onEvents, onStatus });
    this.lastTs = null;
    this.resuming = false; // set by RealtimeAdapter.resumeFrom after a live switch
  }

  _deliver(events) {
    for (const e of events) if (this.lastTs == null || e.ts > this.lastTs) this.lastTs = e.ts;
    this.onEvents(events, this.name);
  }

  // Connected: `again` is true after a reconnect; the first connect after a live switch
  // counts as one.
  _live(again) {
    const backfill = (again || this.resuming) && this.lastTs != null;
    this.resuming = false;
    this.onStatus?.(this.name, "live");
    if (backfill) this.backfill(this.lastTs).catch((err) => this.onStatus?.(this.name, "live", `backfill failed: ${err?.message || err}`));
  }
}

// The agent's /api/v1/stream, with reconnect and a history backfill of the gap.
export class WebSocketSource extends Source {
  constructor({ url, httpBase = "", WebSocketImpl, fetchImpl, timers, backoff, onEvents, onStatus, pageLimit = 1000, maxPages = 5 }) {
    super("websocket", onEvents, onStatus);
    Object.assign(this, { url, httpBase, WebSocketImpl, fetchImpl, timers, backoff, pageLimit, maxPages });
    this.attempt = 0;
    this.ws = null;
    this.stopped = false;
    this.connects = 0;
  }

  start() { this.stopped = false; this._connect(); }

  _connect() {
    if (this.stopped) return;
    this.onStatus?.(this.name, this.connects ? "reconnecting" : "connecting");
    const ws = new this.WebSocketImpl(this.url);
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this._live(this.connects++ > 0);
    };
    ws.onmessage = (m) => {
      let msg;
      try { msg = JSON.parse(m.data); } catch { return; }
      if (msg.type === "events" && Array.isArray(msg.events)) this._deliver(msg.events);
      else if (msg.type === "dropped") this.onStatus?.(this.name, "live", `fell behind: ${msg.count} events skipped`);
    };
    ws.onclose = () => {
      if (this.ws !== ws || this.stopped) return;
      this.onStatus?.(this.name, "reconnecting");
      const delay = backoffDelay(this.attempt++, this.backoff);
      this.timer = this.timers.setTimeout(() => this._connect(), delay);
    };
    ws.onerror = () => {};
  }

  // Events since `fromTs` from the agent's history (newest first, paginated), oldest first.
  async backfill(fromTs) {
    let cursor = null;
    const got = [];
    for (let page = 0; page < this.maxPages; page++) {
      const q = new URLSearchParams({ from: String(fromTs - 1), limit: String(this.pageLimit) });
      if (cursor) q.set("cursor", cursor);
      const res = await this.fetchImpl(`${this.httpBase}/api/v1/events?${q}`);
      if (!res.ok) throw new Error(`history answered ${res.status}`);
      const body = await res.json();
      got.push(...body.events);
      cursor = body.next;
      if (!cursor) break;
    }
    if (got.length) this._deliver(got.reverse());
    return got.length;
  }

  stop() {
    this.stopped = true;
    if (this.timer) this.timers.clearTimeout(this.timer);
    if (this.ws) { const ws = this.ws; this.ws = null; try { ws.close(); } catch { /* already closed */ } }
  }
}

// Supabase Realtime postgres_changes INSERTs on the events table; history by PostgREST.
export class SupabaseSource extends Source {
  constructor({ client, table = "monitoring_events", schema = "public", onEvents, onStatus, pageLimit = 1000 }) {
    super("supabase", onEvents, onStatus);
    Object.assign(this, { client, table, schema, pageLimit });
    this.subscribes = 0;
    this.channel = null;
  }

  start() {
    this.onStatus?.(this.name, "connecting");
    this.channel = this.client
      .channel(`sidecar:${this.schema}.${this.table}`)
      .on("postgres_changes", { event: "INSERT", schema: this.schema, table: this.table },
        (payload) => this._deliver([rowToEvent(payload.new)]))
      .subscribe((status, err) => {
        if (status === "SUBSCRIBED") {
          this._live(this.subscribes++ > 0);
        } else if (status === "CHANNEL_ERROR" || status === "TIMED_OUT" || status === "CLOSED") {
          // realtime-js rejoins by itself with backoff; the backfill above closes the gap.
          this.onStatus?.(this.name, status === "CLOSED" ? "closed" : "reconnecting", err ? String(err.message || err) : undefined);
        }
      });
  }

  // Rows since `fromTs` (oldest first) through PostgREST.
  async backfill(fromTs) {
    const events = (await supabaseHistory(this.client, this.table, { since: fromTs - 1, limit: this.pageLimit })).reverse();
    if (events.length) this._deliver(events);
    return events.length;
  }

  stop() {
    if (this.channel) { const ch = this.channel; this.channel = null; this.client.removeChannel(ch); }
  }
}

// The one interface the dashboard uses. `onEvents(events)` receives each event once.
export class RealtimeAdapter {
  constructor({ mode = "websocket", seen = null, onEvents, onStatus, wsUrl, httpBase = "", WebSocketImpl, fetchImpl,
    supabase = null, table, schema, timers, backoff } = {}) {
    if (!MODES.includes(mode)) throw new Error(`unknown data source ${mode}`);
    if (mode !== "websocket" && !supabase) throw new Error(`data source ${mode} needs a Supabase client (is the dashboard's supabase url configured?)`);
    this.mode = mode;
    this.onEvents = onEvents;
    this.onStatus = onStatus;
    this.seen = seen || new IdWindow(); // shared with the previous adapter during a live switch
    this.stats = { delivered: 0, duplicates: 0, firstBy: { websocket: 0, supabase: 0 } };
    this.status = {};
    const emit = (events, source) => this._receive(events, source);
    const status = (source, state, detail) => { this.status[source] = { state, detail }; this.onStatus?.(source, state, detail); };
    this.sources = [];
    if (mode !== "supabase") {
      this.sources.push(new WebSocketSource({ url: wsUrl, httpBase, WebSocketImpl, fetchImpl,
        timers: timers || { setTimeout: (f, ms) => setTimeout(f, ms), clearTimeout: (t) => clearTimeout(t) },
        backoff, onEvents: emit, onStatus: status }));
    }
    if (mode !== "websocket") {
      this.sources.push(new SupabaseSource({ client: supabase, table, schema, onEvents: emit, onStatus: status }));
    }
  }

  _receive(events, source) {
    const fresh = [];
    for (const e of events) {
      if (this.seen.add(e.id)) {
        fresh.push(e);
        this.stats.firstBy[source] = (this.stats.firstBy[source] || 0) + 1;
      } else {
        this.stats.duplicates++;
      }
    }
    if (fresh.length) {
      this.stats.delivered += fresh.length;
      this.onEvents(fresh, source);
    }
  }

  // Mark ids already shown (e.g. from the initial history load) so live copies are dropped.
  markSeen(events) { for (const e of events) this.seen.add(e.id); }

  // After a live switch of data source: once connected, backfill everything since `ts`
  // (the moment the previous source stopped), so no event falls into the gap.
  resumeFrom(ts) {
    for (const s of this.sources) { s.lastTs = ts; s.resuming = true; }
    return this;
  }

  // True once every source is connected.
  isLive() { return this.sources.every((s) => this.status[s.name]?.state === "live"); }

  start() { for (const s of this.sources) s.start(); return this; }
  stop() { for (const s of this.sources) s.stop(); }
}
