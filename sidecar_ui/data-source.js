// The live data source: builds the RealtimeAdapter that /api/v1/ui-config's data_source
// (the `dashboard.data_source` flag) asks for, switches it live when that changes, loads
// the newest events before the first connect, and shows the connection in the header.

import { RealtimeAdapter, rowToEvent, supabaseHistory } from "./realtime-adapter.js";
import { createSupabaseClient } from "./supabase-client.js";

// supabase-js by a path relative to this module, so the page works from any folder (an
// exported dashboard hosted anywhere), not only from the agent's /ui/.
const importRelative = (path) => import(new URL(`.${path.replace(/^\/ui/, "")}`, import.meta.url).href);

export class DataSource {
  constructor({ $, win, api, banner, onEvents, onRecent, recentRows = 50 }) {
    Object.assign(this, { $, win, api, banner, onEvents, onRecent, recentRows });
    this.uiConfig = null;
    this.adapter = null;
    this.supabase = null;
  }

  async connect(cfg) {
    // A live switch keeps the old source running until the new one is live, and the
    // two share one de-duplication window: no event falls into the gap, none shows twice.
    this.uiConfig = cfg;
    const old = this.adapter;
    const mode = cfg.data_source;
    const badge = this.$("data-source");
    badge.textContent = mode;
    badge.dataset.mode = mode;
    try {
      this.supabase = await createSupabaseClient(cfg, importRelative);
      const loc = this.win.location;
      this.adapter = new RealtimeAdapter({
        mode,
        seen: old?.seen,
        wsUrl: `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/api/v1/stream`,
        WebSocketImpl: this.win.WebSocket,
        fetchImpl: (...a) => this.win.fetch(...a),
        supabase: this.supabase?.client,
        table: this.supabase?.table,
        schema: this.supabase?.schema,
        onEvents: (events, source) => this.onEvents(events, source),
        onStatus: () => this.showConnection(),
      });
      this.banner("");
      if (old) this.adapter.resumeFrom(Date.now() / 1000 - 1);
      else await this.loadRecent();
      this.adapter.start();
      if (old) this.retire(old, this.adapter);
    } catch (err) {
      if (old) old.stop();
      this.banner(`live data unavailable (${mode}): ${err.message}`);
      this.$("conn").textContent = "offline";
    }
  }

  // Stop the previous source once its successor is live (or after 10 s at the latest).
  retire(old, next) {
    const t0 = Date.now();
    const check = () => {
      if (this.adapter !== next || next.isLive() || Date.now() - t0 > 10000) old.stop();
      else this.win.setTimeout(check, 50);
    };
    check();
  }

  // The newest events (newest first) from the source's own history, marked as seen so
  // their live copies are dropped, then handed to `onRecent`.
  async loadRecent() {
    let events = [];
    try {
      if (this.adapter.mode === "supabase") {
        events = await supabaseHistory(this.supabase.client, this.supabase.table, { limit: this.recentRows });
      } else if (this.uiConfig.store) {
        events = (await this.api.get(`/api/v1/events?limit=${this.recentRows}`)).events;
      }
    } catch (err) {
      this.banner(`history unavailable: ${err.message}`);
    }
    this.adapter.markSeen(events);
    this.onRecent(events);
  }

  // The newest events named `name` since `since` (seconds), newest first, from the source's
  // own history (Supabase, or the agent's store); [] when there is none. The Fleet tab's
  // first load: heartbeats are too sparse to be among the newest events.
  async named(name, since, limit = 1000) {
    if (this.adapter?.mode === "supabase" && this.supabase) {
      const { data, error } = await this.supabase.client.from(this.supabase.table).select("*")
        .eq("event_type", name).gte("timestamp", new Date(since * 1000).toISOString())
        .order("timestamp", { ascending: false }).limit(limit);
      if (error) throw new Error(error.message);
      return (data || []).map(rowToEvent);
    }
    if (!this.uiConfig?.store) return [];
    const q = new URLSearchParams({ name, from: String(since), limit: String(limit) });
    return (await this.api.get(`/api/v1/events?${q}`)).events;
  }

  // Follows a change of the data source (or of the Supabase settings) without a reload.
  async poll() {
    if (!this.uiConfig || this.uiConfig.agentless) return; // not connected yet; or no agent to ask
    let cfg;
    try { cfg = await this.api.get("/api/v1/ui-config"); } catch { return; }
    const changed = cfg.data_source !== this.uiConfig.data_source
      || JSON.stringify(cfg.supabase) !== JSON.stringify(this.uiConfig.supabase);
    this.uiConfig = cfg;
    if (changed) await this.connect(cfg);
  }

  showConnection() {
    const st = this.adapter?.status || {};
    const states = Object.entries(st).map(([src, s]) => `${src}: ${s.state}`);
    const conn = this.$("conn");
    const live = Object.values(st).length && Object.values(st).every((s) => s.state === "live");
    conn.textContent = states.join(" · ") || "offline";
    conn.classList.toggle("live", Boolean(live));
  }

  // Which source delivered each event first (in dual mode), and the duplicates dropped.
  showStats() {
    const s = this.adapter.stats;
    this.$("source-stats").textContent = `first: ws ${s.firstBy.websocket} · supabase ${s.firstBy.supabase} · duplicates dropped ${s.duplicates}`;
  }
}
