// The Processes tab: the processes that forward their events to this agent (gunicorn,
// uvicorn or Celery workers sharing its data dir; docs/multiprocess.md), one row per pid:
// connected or gone, events committed, batches, last seen, events lost and spilled.
// From /api/v1/status while the tab is shown (the tabs refresh it every 2 s).

import * as P from "./panels.js";

export class ProcessesTab {
  constructor({ $, api }) { Object.assign(this, { $, api }); }

  async load() {
    try {
      const s = await this.api.get("/api/v1/status");
      const fws = s.forwarders || [];
      P.fill(this.$("forwarders"), fws.map(P.forwarderRow), "no process forwards to this agent");
      const connected = fws.filter((f) => f.connected).length;
      const me = s.owner?.pid ? `this agent runs as pid ${s.owner.pid} and owns the data dir; ` : "";
      P.setStatus(this.$("processes-status"), `${me}${connected} of ${fws.length} forwarders connected`);
    } catch (err) {
      P.setStatus(this.$("processes-status"), `cannot load processes: ${err.message}`, "error");
    }
  }
}
