// The dlp-lora playground: a client of the server's OpenAI-compatible endpoints, nothing else.
//   GET  v1/models            the base model and the adapters, each with its routing state
//   POST v1/chat/completions  streamed (SSE); every chunk carries `routing` (adapters, weights, base_reason)
// No build step, no dependencies. The API key (when the server asks for one) stays in this browser's localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { base: null, adapters: [], history: [], busy: false, key: localStorage.getItem("dlp-lora-key") || "" };
const mix = new Map();  // adapter name -> {on, weight} of the mix editor

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

function status(text) { $("status").textContent = text || ""; }

async function errorText(resp) {
  try { const body = await resp.json(); return (body.error && body.error.message) || JSON.stringify(body); }
  catch (_) { return resp.status + " " + resp.statusText; }
}

// ------------------------------------------------------------------ the library (GET /v1/models)
async function loadModels() {
  const resp = await fetch("v1/models", { headers: headers() });
  if (resp.status === 401) {
    $("key-form").classList.remove("hidden");
    status(state.key ? "the API key was refused" : "this server needs an API key");
    return;
  }
  if (!resp.ok) { status("GET /v1/models: " + await errorText(resp)); return; }
  const data = (await resp.json()).data;
  state.base = data[0].id;
  state.adapters = data.filter((m) => m.routing !== undefined)  // the adapters (the base model and "dlp-lora" have none)
    .map((m) => ({ name: m.id, routing: m.routing, note: m.routing_note }));
  $("model-name").textContent = state.base + " · " + state.adapters.length + " adapters";
  status("");
  renderLibrary();
  renderPinSelect();
  renderMixEditor();
}

function renderLibrary() {
  const ul = $("adapters");
  ul.replaceChildren();
  for (const a of state.adapters) {
    const li = el("li");
    li.dataset.name = a.name;
    const name = el("span", "name", a.name);
    const badge = el("span", "state " + a.routing, a.routing);
    if (a.note) badge.title = a.note;
    const pin = el("button", "link", "pin");
    pin.type = "button";
    pin.title = "use only this adapter";
    pin.addEventListener("click", () => { setMode("pin"); $("pin-select").value = a.name; });
    li.append(name, badge, pin);
    ul.append(li);
  }
  if (!state.adapters.length) ul.append(el("li", "muted", "no adapters: the base model answers"));
}

function renderPinSelect() {
  const sel = $("pin-select");
  const keep = sel.value;
  sel.replaceChildren(...state.adapters.map((a) => { const o = el("option", "", a.name); o.value = a.name; return o; }));
  if (state.adapters.some((a) => a.name === keep)) sel.value = keep;
}

function renderMixEditor() {
  const box = $("mix-editor");
  box.replaceChildren();
  for (const a of state.adapters) {
    if (!mix.has(a.name)) mix.set(a.name, { on: false, weight: 0.5 });
    const m = mix.get(a.name);
    const row = el("div", "mix-row");
    row.dataset.name = a.name;
    const on = el("input"); on.type = "checkbox"; on.checked = m.on; on.setAttribute("aria-label", "mix " + a.name);
    const label = el("span", "label", a.name);
    const range = el("input"); range.type = "range"; range.min = "0"; range.max = "1"; range.step = "0.05";
    range.value = String(m.weight);
    const num = el("input"); num.type = "number"; num.min = "0"; num.step = "0.05"; num.value = String(m.weight);
    num.setAttribute("aria-label", "weight of " + a.name);
    on.addEventListener("change", () => { m.on = on.checked; });
    range.addEventListener("input", () => { m.weight = Number(range.value); num.value = range.value; m.on = on.checked = true; });
    num.addEventListener("input", () => { m.weight = Number(num.value); range.value = num.value; m.on = on.checked = true; });
    row.append(on, label, range, num);
    box.append(row);
  }
}

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function setMode(value) {
  document.querySelector(`input[name=mode][value="${value}"]`).checked = true;
  $("mix-editor").classList.toggle("hidden", value !== "mix");
}

// ------------------------------------------------------------------ a chat turn (POST /v1/chat/completions)
function requestBody(messages) {
  const body = { model: state.base || "dlp-lora", messages, stream: true, stream_options: { include_usage: true },
                 max_tokens: Number($("max-tokens").value) || 128 };
  const t = Number($("temperature").value);
  if (t > 0) body.temperature = t;
  const m = mode();
  if (m === "pin") body.model = $("pin-select").value;
  if (m === "base") body.adapters = {};
  if (m === "mix") {
    body.adapters = {};
    for (const [name, w] of mix) if (w.on && w.weight > 0 && state.adapters.some((a) => a.name === name)) body.adapters[name] = w.weight;
  }
  return body;
}

function addMessage(role, text) {
  const box = el("div", "msg " + role);
  box.append(el("div", "who", role === "user" ? "you" : role === "error" ? "error" : "assistant"), el("div", "text", text));
  $("messages").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function renderRouting(box, routing, stats) {
  let panel = box.querySelector(".routing");
  if (!panel) { panel = el("div", "routing"); box.append(panel); }
  panel.replaceChildren();
  const head = el("div", "head");
  const how = { plugin: "routed by the plugin", pinned: "pinned", explicit: "your mix" }[routing.source] || routing.source;
  head.append(el("span", "source", how), el("span", "speed", stats || ""));
  panel.append(head);
  const ads = routing.adapters || [];
  if (!ads.length) {
    panel.append(el("div", "base-reason", "base model" + (routing.base_reason ? ": " + routing.base_reason : "")));
    return;
  }
  const top = Math.max(...ads.map((a) => a.weight), 1e-9);
  for (const a of ads) {
    const row = el("div", "bar-row");
    row.dataset.name = a.name;
    const bar = el("div", "bar");
    const fill = el("span");
    fill.style.width = (100 * a.weight / top).toFixed(1) + "%";
    bar.append(fill);
    row.append(el("span", "label", a.name), bar, el("span", "weight", a.weight.toFixed(3)));
    panel.append(row);
  }
}

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history, { role: "user", content: text });
  addMessage("user", text);
  const box = addMessage("assistant", "");
  const out = box.querySelector(".text");
  const t0 = performance.now();
  let first = null, tokens = 0, usage = null, routing = null, reply = "";
  const resp = await fetch("v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages)) });
  if (!resp.ok) {
    box.className = "msg error";
    out.textContent = resp.status + ": " + await errorText(resp);
    if (resp.status === 401) $("key-form").classList.remove("hidden");
    box.dataset.done = "error";
    return;
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) { box.className = "msg error"; out.textContent = chunk.error.message; continue; }
        if (chunk.routing && !routing) { routing = chunk.routing; renderRouting(box, routing, "…"); }
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices || []) {
          const piece = (c.delta && c.delta.content) || "";
          if (piece) { if (first === null) first = performance.now(); tokens += 1; reply += piece; out.textContent = reply; }
        }
      }
    }
    box.scrollIntoView({ block: "end" });
  }
  const n = usage ? usage.completion_tokens : tokens;
  const secs = (performance.now() - t0) / 1000;
  const ttft = first === null ? null : (first - t0) / 1000;
  const stats = `${n} tokens · ${(n / Math.max(secs, 1e-3)).toFixed(1)} tok/s` + (ttft === null ? "" : ` · first token ${ttft.toFixed(2)} s`);
  if (routing) renderRouting(box, routing, stats);
  box.dataset.done = "1";
  state.history.push({ role: "user", content: text }, { role: "assistant", content: reply });
}

// ------------------------------------------------------------------ wiring
function init() {
  $("api-key").value = state.key;
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    localStorage.setItem("dlp-lora-key", state.key);
    loadModels();
  });
  for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", () => setMode(mode()));
  $("refresh").addEventListener("click", loadModels);
  $("reset").addEventListener("click", () => { state.history = []; $("messages").replaceChildren(); });
  $("composer").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.busy) return;
    state.busy = true; $("send").disabled = true; $("prompt").value = "";
    try { await send(text); }
    catch (err) { addMessage("error", String(err)); }
    finally { state.busy = false; $("send").disabled = false; loadModels(); }
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  loadModels();
  setInterval(() => { if (!state.busy) loadModels(); }, 5000);  // routing states change (training -> routable)
}

document.addEventListener("DOMContentLoaded", init);
