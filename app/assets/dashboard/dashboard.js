/* The dashboard: models with their actions, and the live memory timeline.
 *
 * Everything goes through the control API on this page's own origin; the token rides in
 * the HttpOnly cookie the daemon set when the page was opened from the tray or
 * `ebbtide dashboard` (app/server/auth.py). Memory is sampled every second; the event
 * stream (/control/events) marks reclaims on the timeline and refreshes model states, and
 * "pull" events draw a progress bar per model being fetched (from here, the CLI or any
 * Ollama client). Models of remote servers are marked with the remote's name.
 */
"use strict";

const WINDOW_S = 300, SAMPLE_MS = 1000;
const SCALES = ["auto", "device", "models"];
const state = { samples: [], markers: [], names: [], models: [], autoYield: true, scale: "auto", pulls: {} };
const $ = id => document.getElementById(id);

async function api(method, path, body) {
  const response = await fetch(path, {
    method, credentials: "same-origin",
    headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  if (response.status === 401) {
    throw new Error("Not authorized: open the dashboard from the tray menu or with `ebbtide dashboard`.");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const err = data.error;
    throw new Error((err && (err.message || err)) || response.statusText);
  }
  return data;
}

function problem(message) {
  const node = $("problem");
  node.hidden = !message;
  node.textContent = message || "";
}

const FIRST_ACTION = { paused: ["Resume", "resume"], loaded: ["Pause", "pause"], loading: ["Pause", "pause"] };

function shownState(m) {
  if (m.state === "loaded") return m.busy ? "busy" : "idle";
  if (m.rung === "weights_on_host") return "off GPU";   // paused, its weights in host memory too
  return m.state;
}

function heldBytes(m) { return m.memory ? (m.memory.weights || 0) + (m.memory.kv_held || 0) : 0; }

// Host memory the model holds: paused KV, weights moved off the GPU, parked prompts, and
// the buffers kept so a pause needs no allocation (pinned on the GPU).
function hostBytes(m) {
  const mem = m.memory || {};
  return (mem.paused_host || 0) + (mem.weights_host || 0) + (mem.prompt_cache_host || 0) + (mem.staging_host || 0);
}

function memoryText(m) {
  if (m.state === "unloaded") return "";
  const host = hostBytes(m);
  return Timeline.formatBytes(heldBytes(m)) + (host ? ` \u00b7 host ${Timeline.formatBytes(host)}` : "");
}

function renderModels() {
  const body = $("models").querySelector("tbody");
  body.textContent = "";
  for (const m of state.models) {
    const tr = document.createElement("tr");
    tr.dataset.model = m.name;
    const st = shownState(m);
    const cells = [m.name, null, m.engine || "", memoryText(m),
                   String(m.priority ?? 0)];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      if (i === 0 && m.source === "remote") {
        td.textContent = text;
        const where = document.createElement("span");
        where.className = "remote";
        where.textContent = `remote${m.remote ? ": " + m.remote : ""}`;
        td.appendChild(where);
      } else if (i === 1) {
        const badge = document.createElement("span");
        badge.className = `state state-${st.replace(/\s+/g, "-")}`;
        badge.textContent = st;
        td.appendChild(badge);
      } else td.textContent = text;
      tr.appendChild(td);
    });
    const actions = document.createElement("td");
    actions.className = "actions";
    const inMemory = m.state !== "unloaded";
    const [label, verb] = FIRST_ACTION[m.state] || ["Pause", "pause"];
    const buttons = [[label, verb], ["Free all GPU memory, keep ready", "weights_to_host"],
                     ["Give back memory", "reclaim"], ["Unload", "unload"]];
    for (const [text, action] of buttons) {
      const button = document.createElement("button");
      button.textContent = text;
      button.dataset.action = action;
      button.disabled = !inMemory || (action === "weights_to_host" && m.rung === "weights_on_host");
      button.onclick = () => act(`/control/models/${encodeURIComponent(m.name)}/${action}`);
      actions.appendChild(button);
    }
    tr.appendChild(actions);
    body.appendChild(tr);
  }
}

async function act(path, body) {
  try {
    await api("POST", path, body);
    problem("");
    await refreshModels();
  } catch (e) { problem(e.message); }
}

async function refreshModels() {
  const data = await api("GET", "/control/models");
  state.models = data.models || [];
  for (const m of state.models) if (!state.names.includes(m.name)) state.names.push(m.name);
  renderModels();
}

function deviceOf(memory) {
  const d = memory.device || {};
  const pick = k => d[`${k}_bytes`] ?? d[k] ?? 0;
  return { total: pick("total"), free: pick("free"), others: pick("others") };
}

async function sample() {
  const memory = await api("GET", "/control/memory");
  const device = deviceOf(memory);
  const models = {};
  for (const [name, m] of Object.entries(memory.models || {})) {
    models[name] = m ? (m.total ?? heldBytes({ memory: m })) : 0;
    if (!state.names.includes(name)) state.names.push(name);
  }
  state.samples.push({ t: Date.now() / 1000, models, ...device });
  const cutoff = Date.now() / 1000 - WINDOW_S - 10;
  while (state.samples.length && state.samples[0].t < cutoff) state.samples.shift();
  state.autoYield = !!memory.auto_yield;
  $("auto-yield").checked = state.autoYield;
  const held = Object.values(models).reduce((a, b) => a + b, 0);
  $("summary").textContent = `models hold ${Timeline.formatBytes(held)} of ${Timeline.formatBytes(device.total)}` +
    ` \u00b7 others ${Timeline.formatBytes(device.others)} \u00b7 free ${Timeline.formatBytes(device.free)}` +
    ` \u00b7 ${memory.backend || ""}`;
}

function draw() {
  Timeline.legend($("legend"), state.names);
  const now = Date.now() / 1000;
  // A fresh page shows what it has seen (at least 20 s), growing to the full window.
  const seen = state.samples.length ? now - state.samples[0].t : 0;
  const span = Math.min(WINDOW_S, Math.max(20, seen * 1.15));
  $("window").textContent = span < 120 ? `${span.toFixed(0)} seconds` : `${(span / 60).toFixed(0)} minutes`;
  Timeline.render($("timeline"), state.samples, state.markers,
                  { now, windowS: span, names: state.names, scale: state.scale });
}

function logEvent(event) {
  const li = document.createElement("li");
  const when = new Date((event.time || Date.now() / 1000) * 1000).toLocaleTimeString();
  const bytes = event.bytes_returned ? ` gave back ${Timeline.formatBytes(event.bytes_returned)}` : "";
  const who = event.model || event.client || "";
  li.textContent = `${when} ${event.kind} ${who} ${event.state || event.step || event.reason || ""}${bytes}`;
  if (isReclaim(event)) li.className = "reclaim";
  const list = $("events");
  list.prepend(li);
  while (list.children.length > 100) list.lastChild.remove();
}

function isReclaim(event) {
  return event.kind === "reclaim" || ((event.kind === "broker" || event.kind === "model") &&
                                      (event.bytes_returned || 0) > 0);
}

function renderPulls() {
  const box = $("pulls");
  box.textContent = "";
  for (const [model, p] of Object.entries(state.pulls)) {
    const row = document.createElement("div");
    row.className = "pull";
    row.dataset.model = model;
    const name = document.createElement("span");
    name.textContent = model;
    const bar = document.createElement("progress");
    bar.max = p.total || 1;
    bar.value = p.total ? (p.completed || 0) : (p.status === "success" ? 1 : 0);
    const text = document.createElement("span");
    text.className = p.status === "failed" ? "failed" : "";
    text.textContent = p.status === "failed" ? p.error :
      p.total ? `${p.status} ${Timeline.formatBytes(p.completed || 0)} / ${Timeline.formatBytes(p.total)}` : p.status;
    row.append(name, bar, text);
    box.appendChild(row);
  }
}

function onPull(event) {
  const p = state.pulls[event.model] || {};
  // Byte counts stay on the bar while the digest is verified and after success.
  state.pulls[event.model] = { ...p, status: event.status, error: event.error || "",
                               ...(event.total ? { total: event.total, completed: event.completed } : {}) };
  renderPulls();
  if (event.status === "success") refreshModels().catch(e => problem(e.message));
}

async function startPull(name) {
  // The pull runs while this request is open (closing the page cancels it, as in Ollama);
  // its progress arrives through the event stream, as any client's pull does.
  const response = await fetch("/api/pull", { method: "POST", headers: { "Content-Type": "application/json" },
                                              body: JSON.stringify({ model: name }) });
  const text = await response.text();
  const last = text.trim().split("\n").pop() || "{}";
  const error = JSON.parse(last).error;
  if (!response.ok || error) problem(`pull ${name}: ${error || response.statusText}`);
}

function onEvent(event) {
  if (event.kind === "pull") { onPull(event); return; }
  logEvent(event);
  if (isReclaim(event)) {
    Timeline.addMarker(state.markers, { t: event.time || Date.now() / 1000, bytes: event.bytes_returned || 0,
                                        model: event.model || event.client || "*",
                                        reason: event.reason || event.step }, event.kind === "reclaim");
    draw();
  }
  if (event.kind === "model" || event.kind === "reclaim") refreshModels().catch(e => problem(e.message));
}

const EVENT_KINDS = ["reclaim", "model", "broker", "progress", "settings", "shutdown", "message", "pull"];

function follow() {
  const source = new EventSource("/control/events");
  for (const kind of EVENT_KINDS) {
    source.addEventListener(kind, msg => {
      try { onEvent({ kind, ...JSON.parse(msg.data) }); } catch (e) { console.warn(e); }
    });
  }
  source.onerror = () => problem("Lost the event stream; reconnecting...");
  source.onopen = () => problem("");
}

async function tick() {
  try { await sample(); draw(); }
  catch (e) { problem(e.message); }
}

function start() {
  $("reclaim-all").onclick = () => act("/control/reclaim");
  $("pull-form").onsubmit = e => {
    e.preventDefault();
    const name = $("pull-name").value.trim();
    if (name) startPull(name).catch(err => problem(err.message));
  };
  $("auto-yield").onchange = e => act("/control/auto-yield", { enabled: e.target.checked });
  $("timeline").addEventListener("dblclick", () => {
    state.scale = SCALES[(SCALES.indexOf(state.scale) + 1) % SCALES.length];
    draw();
  });
  refreshModels().then(tick).then(follow).catch(e => problem(e.message));
  setInterval(tick, SAMPLE_MS);
}

start();
