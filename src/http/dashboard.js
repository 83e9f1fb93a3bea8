// botvisor dashboard: live from GET /api/events, every user-supplied text set with
// textContent (never parsed as HTML). The API key stays in this tab's sessionStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const sessions = new Map(); // userId -> session fields
let lastEventId = null;
let watchedCode = null; // { userId, code, expiresAt }

function key() {
  return sessionStorage.getItem("botvisorKey") || "";
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (key()) h["X-API-Key"] = key();
  return h;
}

function say(text, bad) {
  const el = $("status");
  el.textContent = text;
  el.className = bad ? "bad" : "good";
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const resp = await fetch(path, init);
  let data = {};
  try {
    data = await resp.json();
  } catch (_) {
    data = { success: false, message: "HTTP " + resp.status };
  }
  return { status: resp.status, data };
}

function uptime(s) {
  if (s.state !== "online" || !s.lastSeenAt) return "";
  const secs = Math.max(0, Math.floor((Date.now() - Date.parse(s.lastSeenAt)) / 1000));
  const h = Math.floor(secs / 3600), m = Math.floor((secs % 3600) / 60), sec = secs % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

const ACTIONS = [
  ["start", "POST", "start"],
  ["stop", "POST", "stop"],
  ["logout", "POST", "logout"],
  ["backup", "POST", "backup"],
  ["restore", "POST", "restore"],
  ["delete", "DELETE", ""],
];

function render() {
  const filter = $("filter").value;
  const body = $("rows");
  body.replaceChildren();
  const ids = [...sessions.keys()].sort();
  let online = 0;
  for (const id of ids) {
    const s = sessions.get(id);
    if (s.state === "online") online++;
    if (filter && s.state !== filter) continue;
    const tr = document.createElement("tr");
    tr.className = s.state;
    tr.dataset.user = id;
    cell(tr, id, "user");
    cell(tr, s.phoneNumber);
    cell(tr, s.name);
    cell(tr, s.status, "status");
    cell(tr, s.state, "state");
    cell(tr, s.desired);
    cell(tr, s.restarts, "restarts");
    cell(tr, s.disconnects);
    cell(tr, s.lastError, "error");
    cell(tr, uptime(s), "uptime");
    const td = cell(tr, "");
    for (const [label, method, path] of ACTIONS) {
      const b = document.createElement("button");
      b.textContent = label;
      b.dataset.action = label;
      b.addEventListener("click", () => act(id, label, method, path));
      td.appendChild(b);
    }
    body.appendChild(tr);
  }
  if (!ids.length) {
    const tr = document.createElement("tr");
    const td = cell(tr, "No sessions yet: create one above.");
    td.colSpan = 11;
    body.appendChild(tr);
  }
  $("summary").textContent = `${sessions.size} sessions, ${online} online`;
}

async function act(id, label, method, path) {
  if ((label === "delete" || label === "logout") && !confirm(`${label} ${id}?`)) return;
  const url = "/api/sessions/" + encodeURIComponent(id) + (path ? "/" + path : "");
  const r = await api(method, url);
  say(r.data.message || (r.data.success ? `${label}: done` : `${label}: HTTP ${r.status}`), !r.data.success);
  if (r.data.success) await load();
}

async function load() {
  const r = await api("GET", "/api/sessions");
  if (!r.data.success) {
    say(r.data.message || "cannot list sessions", true);
    return;
  }
  sessions.clear();
  for (const s of r.data.sessions) sessions.set(s.userId, s);
  render();
}

function showCode(userId, code, expiresAt) {
  watchedCode = { userId, code, expiresAt };
  $("pairing").hidden = false;
  $("pairing-user").textContent = userId;
  $("pairing-code").textContent = code || "(code hidden: enter the API key)";
  tick();
}

function tick() {
  if (watchedCode) {
    const s = sessions.get(watchedCode.userId);
    const el = $("pairing-expiry");
    if (s && s.state === "online") {
      el.textContent = "paired: online";
      $("pairing").className = "done";
    } else {
      const left = Math.max(0, Math.round((Date.parse(watchedCode.expiresAt) - Date.now()) / 1000));
      el.textContent = `expires in ${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`;
      $("pairing").className = left ? "" : "expired";
    }
  }
  for (const td of document.querySelectorAll("td.uptime")) {
    const s = sessions.get(td.parentElement.dataset.user);
    if (s) td.textContent = uptime(s);
  }
}

function onEvent(kind, data) {
  const e = JSON.parse(data);
  if (kind === "session.state") {
    const s = sessions.get(e.userId) || { userId: e.userId };
    Object.assign(s, e);
    if (e.state === "online") s.lastSeenAt = e.at;
    sessions.set(e.userId, s);
    render();
  } else if (kind === "session.deleted") {
    sessions.delete(e.userId);
    render();
  } else if (kind === "session.pairing_code") {
    // A stream without the key gets the event without the code: keep the code we have.
    if (watchedCode && watchedCode.userId === e.userId && e.pairingCode) {
      showCode(e.userId, e.pairingCode, e.expiresAt);
    }
  }
}

// fetch() rather than EventSource: it can send the key header. A new key reopens the
// stream (resuming by Last-Event-ID), so pairing codes come with it.
let streamAbort = null;

async function stream() {
  for (;;) {
    try {
      const h = headers();
      if (lastEventId) h["Last-Event-ID"] = lastEventId;
      streamAbort = new AbortController();
      const resp = await fetch("/api/events", { headers: h, signal: streamAbort.signal });
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      $("live").textContent = "live";
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          let kind = "message", data = "", id = null;
          for (const line of block.split("\n")) {
            if (line.startsWith("id: ")) id = line.slice(4);
            else if (line.startsWith("event: ")) kind = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
          }
          if (id) lastEventId = id;
          if (data) onEvent(kind, data);
        }
      }
    } catch (_) {
      // fall through to reconnect
    }
    if (streamAbort && streamAbort.signal.aborted) continue; // reopened on purpose
    $("live").textContent = "reconnecting";
    await new Promise((r) => setTimeout(r, 2000));
  }
}

async function create(ev) {
  ev.preventDefault();
  const userId = $("new-user").value.trim();
  const phoneNumber = $("new-phone").value.trim();
  const r = await api("POST", "/api/sessions", { userId, phoneNumber });
  if (r.status === 201) {
    say(r.data.message, false);
    sessions.set(userId, r.data);
    render();
    showCode(userId, r.data.pairingCode, r.data.expiresAt);
  } else {
    say(r.data.message || "HTTP " + r.status, true);
  }
}

window.addEventListener("DOMContentLoaded", () => {
  $("key").value = key();
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("botvisorKey", $("key").value);
    say("key saved for this tab", false);
    if (streamAbort) streamAbort.abort();
    load();
  });
  $("create-form").addEventListener("submit", create);
  $("filter").addEventListener("change", render);
  setInterval(tick, 1000);
  load();
  stream();
});
