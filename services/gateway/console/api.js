// The HTTP API, as every other client sees it: one helper for JSON calls, one SSE reader.
// Credentials (a session token or an API key) live in sessionStorage: gone with the tab.

const TOKEN = "sdswarm.token";
const USER = "sdswarm.user";

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.message || body?.detail || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

export const session = {
  get token() { return sessionStorage.getItem(TOKEN) || ""; },
  get user() { return sessionStorage.getItem(USER) || ""; },
  set(token, user) {
    sessionStorage.setItem(TOKEN, token);
    sessionStorage.setItem(USER, user);
  },
  clear() {
    sessionStorage.removeItem(TOKEN);
    sessionStorage.removeItem(USER);
  },
};

function headers(extra = {}) {
  const out = { ...extra };
  if (session.token) out.Authorization = `Bearer ${session.token}`;
  return out;
}

async function parse(response) {
  const text = await response.text();
  try { return text ? JSON.parse(text) : null; } catch { return { message: text }; }
}

/** A JSON call; throws ApiError on a non-2xx answer (its message is the API's). */
export async function api(method, path, body, extraHeaders = {}) {
  const init = { method, headers: headers(extraHeaders) };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await parse(response);
  if (!response.ok) {
    // A session that expired (or a key that was revoked): the shell asks to sign in again.
    if (response.status === 401 && session.token) window.dispatchEvent(new Event("sdswarm:unauthorized"));
    throw new ApiError(response.status, data);
  }
  return data;
}

/** Upload a file with a streamed PUT; onProgress(fraction) as bytes leave the browser. */
export function upload(path, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", path);
    for (const [name, value] of Object.entries(headers())) xhr.setRequestHeader(name, value);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch { data = { message: xhr.responseText }; }
      if (xhr.status >= 200 && xhr.status < 300) resolve(data);
      else reject(new ApiError(xhr.status, data));
    };
    xhr.onerror = () => reject(new ApiError(0, { message: "the upload failed (network)" }));
    xhr.send(file);
  });
}

/**
 * Follow a task's server-sent events until its terminal event: onEvent(name, data) per
 * event. EventSource cannot send an Authorization header, so the stream is read with fetch.
 * Returns when the stream ends or `signal` aborts.
 */
export async function follow(taskId, onEvent, signal) {
  const response = await fetch(`/tasks/${encodeURIComponent(taskId)}/events`, {
    headers: headers({ Accept: "text/event-stream" }),
    signal,
  });
  if (!response.ok) throw new ApiError(response.status, await parse(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

/** A file as base64 (no data: prefix), as the image fields take it. */
export function fileToBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
