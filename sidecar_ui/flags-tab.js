// The Flags tab: every flag with its value, layer and default; set and clear (the
// server's validation message is shown as is); the audit trail of flag changes, read
// from the history store.

import { ApiError } from "./api.js";
import * as P from "./panels.js";

export const FLAG_EVENT = "sidecar_agent.flag_changed";
export const DATA_SOURCE_FLAG = "dashboard.data_source";

export class FlagsTab {
  // `hasStore()`: whether the agent keeps history (the audit trail needs it);
  // `onDataSourceSet()`: the data source flag was changed from this page.
  constructor({ $, api, hasStore, onDataSourceSet }) {
    Object.assign(this, { $, api, hasStore, onDataSourceSet });
    this.loaded = false;
  }

  // On showing the tab: the table is read once, and again after a change made here.
  refresh() { if (!this.loaded) this.load(); }

  async load() {
    try {
      const body = await this.api.get("/api/v1/flags");
      const flags = Array.isArray(body) ? body : body.flags;
      P.fill(this.$("flags"), flags.map((f) => P.flagRow(f, (fl, v) => this.set(fl, v), (fl) => this.clear(fl))), "no flags");
      P.setStatus(this.$("flags-status"), "");
      this.loaded = true;
    } catch (err) {
      P.setStatus(this.$("flags-status"), `cannot load flags: ${err.message}`, "error");
    }
    this.loadAudit();
  }

  async loadAudit() {
    if (!this.hasStore()) return;
    try {
      const { events } = await this.api.get(`/api/v1/events?name=${FLAG_EVENT}&limit=50`);
      P.fill(this.$("flag-audit"), events.map((e) => P.row([P.time(e.ts), e.data?.flag, e.data?.old, e.data?.new, e.data?.actor])), "no changes yet");
    } catch { /* the flag table still works */ }
  }

  showError(text) {
    const el = this.$("flag-error");
    el.textContent = text || "";
    el.hidden = !text;
  }

  async set(flag, value) {
    this.showError("");
    try {
      await this.api.mutate("PUT", `/api/v1/flags/${encodeURIComponent(flag.name)}`, value);
    } catch (err) {
      this.showError(err instanceof ApiError ? err.message : `cannot change ${flag.name}: ${err.message}`);
      return;
    }
    this.loaded = false;
    await this.load();
    if (flag.name === DATA_SOURCE_FLAG) this.onDataSourceSet();
  }

  async clear(flag) {
    this.showError("");
    try {
      await this.api.mutate("DELETE", `/api/v1/flags/${encodeURIComponent(flag.name)}`);
    } catch (err) {
      this.showError(err.message);
      return;
    }
    this.loaded = false;
    await this.load();
  }
}
