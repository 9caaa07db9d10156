// The Sinks tab (state, breaker, lag and DLQ depth per sink) and the DLQ tab (entries of
// one sink or all, replay and purge). The DLQ's sink picker is filled from the sink list.

import * as P from "./panels.js";

export class SinksTab {
  constructor({ $, api }) { Object.assign(this, { $, api }); }

  async load() {
    try {
      const { sinks } = await this.api.get("/api/v1/sinks");
      P.fill(this.$("sinks"), sinks.map(P.sinkRow), "no sinks configured");
      P.setStatus(this.$("sinks-status"), "");
      const sel = this.$("dlq-sink");
      const want = ["", ...sinks.map((s) => s.name)];
      if (sel.options.length !== want.length) {
        const cur = sel.value;
        sel.replaceChildren(new Option("all sinks", ""), ...sinks.map((s) => new Option(s.name, s.name)));
        sel.value = cur;
      }
    } catch (err) {
      P.setStatus(this.$("sinks-status"), `cannot load sinks: ${err.message}`, "error");
    }
  }
}

export class DlqTab {
  // `sinks`: the SinksTab (fills the sink picker); `confirm(text)`: a yes/no dialog.
  constructor({ $, win, api, sinks, confirm }) {
    Object.assign(this, { $, win, api, sinks, confirm });
    this.message = false; // a replay/purge result is on show; the pending count waits
  }

  bind() {
    this.$("dlq-refresh").addEventListener("click", () => this.load());
    this.$("dlq-replay").addEventListener("click", () => this.replay());
    this.$("dlq-purge").addEventListener("click", () => this.purge());
  }

  query() {
    const sink = this.$("dlq-sink").value;
    return sink ? `?sink=${encodeURIComponent(sink)}` : "";
  }

  async load() {
    if (this.$("dlq-sink").options.length === 1) await this.sinks.load();
    try {
      const body = await this.api.get(`/api/v1/dlq${this.query()}`);
      P.fill(this.$("dlq"), body.entries.map(P.dlqRow), "the dead-letter queue is empty");
      this.$("dlq").dataset.pending = String(body.pending_events);
      if (!this.message) P.setStatus(this.$("dlq-status"), `${P.num(body.pending_events)} events pending`);
    } catch (err) {
      P.setStatus(this.$("dlq-status"), `cannot load the DLQ: ${err.message}`, "error");
    }
  }

  async replay() {
    try {
      const r = await this.api.mutate("POST", `/api/v1/dlq/replay${this.query()}`);
      this.flash(`replay requested for ${r.replaying.join(", ")}`);
    } catch (err) {
      this.flash(`replay failed: ${err.message}`, "error");
    }
    this.load();
  }

  async purge() {
    const sink = this.$("dlq-sink").value || "all sinks";
    if (!(await this.confirm(`Purge every pending DLQ entry of ${sink}? Purged events are counted as lost.`))) return;
    try {
      const r = await this.api.mutate("DELETE", `/api/v1/dlq${this.query()}`);
      this.flash(`purged ${P.num(r.purged_events)} events`);
    } catch (err) {
      this.flash(`purge failed: ${err.message}`, "error");
    }
    this.load();
  }

  // Shows a result for 4 s before the pending count takes the status line back.
  flash(text, kind = "") {
    P.setStatus(this.$("dlq-status"), text, kind);
    this.message = true;
    this.win.setTimeout(() => { this.message = false; }, 4000);
  }
}
