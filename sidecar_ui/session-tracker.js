// Active sessions (by session_id) and agents (by agent_id), from the event stream.
// Pure state: no DOM, so it runs under `node --test`.

export function isError(e) {
  const status = Number(e.tags?.status);
  return /error|exception|fail/i.test(e.name) || e.tags?.level === "error" || status >= 500;
}

export class SessionTracker {
  constructor({ idleSec = 300, rateWindowSec = 10, now = () => Date.now() / 1000 } = {}) {
    Object.assign(this, { idleSec, rateWindowSec, now });
    this.sessions = new Map(); // id -> {id, count, errors, first, last, agent}
    this.agents = new Map(); // id -> {id, last, count, recent: [ts...]}
  }

  ingest(events) {
    for (const e of events) {
      const ts = e.ts;
      if (e.session_id) {
        let s = this.sessions.get(e.session_id);
        if (!s) this.sessions.set(e.session_id, s = { id: e.session_id, count: 0, errors: 0, first: ts, last: ts, agent: e.agent_id });
        s.count++;
        if (isError(e)) s.errors++;
        s.first = Math.min(s.first, ts);
        s.last = Math.max(s.last, ts);
      }
      if (e.agent_id) {
        let a = this.agents.get(e.agent_id);
        if (!a) this.agents.set(e.agent_id, a = { id: e.agent_id, last: ts, count: 0, recent: [] });
        a.count++;
        a.last = Math.max(a.last, ts);
        a.recent.push(this.now());
      }
    }
  }

  activeSessions() {
    const cutoff = this.now() - this.idleSec;
    return [...this.sessions.values()].filter((s) => s.last >= cutoff).sort((a, b) => b.last - a.last);
  }

  agentList() {
    const cutoff = this.now() - this.rateWindowSec;
    return [...this.agents.values()].map((a) => {
      let i = 0;
      while (i < a.recent.length && a.recent[i] < cutoff) i++;
      if (i) a.recent.splice(0, i);
      return { id: a.id, last: a.last, count: a.count, rate: a.recent.length / this.rateWindowSec };
    }).sort((x, y) => x.id.localeCompare(y.id));
  }
}
