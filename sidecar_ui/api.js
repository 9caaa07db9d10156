// HTTP calls to the agent. With a token set on the agent every /api/ call needs it
// (docs/security.md): the first 401 asks for it once (one prompt however many calls were
// refused at the same time), keeps it in this tab (sessionStorage) and sends it as a
// Bearer header. It also opens a session (POST /api/v1/session): an HttpOnly, SameSite
// cookie the browser sends with the live WebSocket, which cannot carry a header.

const TOKEN_KEY = "sidecar-agent-token";

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export class Api {
  constructor({ fetchImpl = (...a) => fetch(...a), storage = null, askToken = async () => null, base = "" } = {}) {
    Object.assign(this, { fetchImpl, storage, askToken, base });
    this.asking = null; // the prompt in progress, shared by every refused call
    this.declined = false; // the prompt was cancelled: reads fail until the page is reloaded
  }

  get(path) {
    return this.call(path, () => ({}), "this agent needs its token to show anything");
  }

  mutate(method, path, body) {
    const init = () => ({
      method,
      headers: body === undefined ? {} : { "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return this.call(path, init, "a token is needed for this change");
  }

  async call(path, init, refused) {
    for (let attempt = 0; attempt < 3; attempt++) {
      const sent = this.storage?.getItem(TOKEN_KEY) || null;
      const req = init();
      req.headers = { Accept: "application/json", ...req.headers };
      if (sent) req.headers.Authorization = `Bearer ${sent}`;
      const res = await this.fetchImpl(this.base + path, req);
      if (res.status !== 401) return this._body(res);
      const current = this.storage?.getItem(TOKEN_KEY) || null;
      if (current && current !== sent) continue; // another call's prompt got a new token meanwhile
      if (!(await this.login(Boolean(sent)))) throw new ApiError(401, refused);
    }
    throw new ApiError(401, "the token was refused");
  }

  // Ask for the token (`again`: the last one was refused); true once there is a new one.
  login(again) {
    if (this.declined) return Promise.resolve(false);
    if (!this.asking) {
      this.asking = (async () => {
        this.storage?.removeItem(TOKEN_KEY);
        const fresh = await this.askToken(again);
        if (!fresh) {
          this.declined = true;
          return false;
        }
        this.storage?.setItem(TOKEN_KEY, fresh);
        try {
          await this.fetchImpl(this.base + "/api/v1/session", {
            method: "POST", headers: { Accept: "application/json", Authorization: `Bearer ${fresh}` },
          });
        } catch { /* the next call reports an unreachable agent */ }
        return true;
      })().finally(() => { this.asking = null; });
    }
    return this.asking;
  }

  async _body(res) {
    let data = null;
    try { data = await res.json(); } catch { /* not JSON */ }
    if (!res.ok) throw new ApiError(res.status, (data && data.error) || `${res.status} ${res.statusText}`);
    return data;
  }
}
