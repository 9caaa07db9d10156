// HTTP calls to the agent. The token is asked once per tab (sessionStorage) and sent
// only with mutating calls; a 401 asks again.

const TOKEN_KEY = "sidecar-agent-token";

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export class Api {
  constructor({ fetchImpl = (...a) => fetch(...a), storage = null, askToken = async () => null, base = "" } = {}) {
    Object.assign(this, { fetchImpl, storage, askToken, base });
  }

  async get(path) {
    const res = await this.fetchImpl(this.base + path, { headers: { Accept: "application/json" } });
    return this._body(res);
  }

  async mutate(method, path, body) {
    for (let attempt = 0; attempt < 3; attempt++) {
      const headers = { Accept: "application/json" };
      const token = this.storage?.getItem(TOKEN_KEY);
      if (token) headers.Authorization = `Bearer ${token}`;
      if (body !== undefined) headers["Content-Type"] = "application/json";
      const res = await this.fetchImpl(this.base + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
      if (res.status !== 401) return this._body(res);
      this.storage?.removeItem(TOKEN_KEY);
      const fresh = await this.askToken(attempt > 0);
      if (!fresh) throw new ApiError(401, "a token is needed for this change");
      this.storage?.setItem(TOKEN_KEY, fresh);
    }
    throw new ApiError(401, "the token was refused");
  }

  async _body(res) {
    let data = null;
    try { data = await res.json(); } catch { /* not JSON */ }
    if (!res.ok) throw new ApiError(res.status, (data && data.error) || `${res.status} ${res.statusText}`);
    return data;
  }
}
