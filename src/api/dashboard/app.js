// Candela's dashboard: polls /v1/engine/stats once a second and draws it; the
// playground streams from /v1/chat/completions or /v1/completions. No
// libraries: the page must work offline, from the binary alone.
"use strict";

const KEY_STORE = "candela-api-key";
const $ = (id) => document.getElementById(id);
let apiKey = localStorage.getItem(KEY_STORE) || "";
let latest = null; // the last stats answer
let pollTimer = null;

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (apiKey) h["Authorization"] = "Bearer " + apiKey;
  return h;
}

function css(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

// ---- numbers ----------------------------------------------------------------

function num(x, digits) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (digits === undefined) digits = Math.abs(x) < 10 ? 1 : 0;
  return x.toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits });
}
function ms(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const m = seconds * 1000;
  return m < 10 ? num(m, 1) : num(m, 0);
}
// A pair of latencies in one unit: milliseconds, or seconds once the larger
// reaches one (so that a tile never needs more than a few digits).
function latencyPair(a, b) {
  if (Math.max(a, b) >= 1) return num(a, 2) + " / " + num(b, 2) + " s";
  return ms(a) + " / " + ms(b) + " ms";
}
function pct(x) {
  return x === null || x === undefined ? "–" : num(x * 100, 1) + "%";
}
function duration(s) {
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.floor(s % 60);
  return "up " + (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s";
}
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return num(n, n < 10 && i ? 1 : 0) + " " + units[i];
}
function last(xs) { return xs && xs.length ? xs[xs.length - 1] : null; }

// ---- charts -----------------------------------------------------------------

function fitCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h };
}

// Lines over the last five minutes: `lines` are [{values, color}], values may
// hold nulls (nothing to show for that second).
function drawChart(canvas, t, lines, opts) {
  const { ctx, w, h } = fitCanvas(canvas);
  const left = 44, right = 6, top = 6, bottom = 18;
  const pw = w - left - right, ph = h - top - bottom;
  let max = opts.max || 0;
  for (const l of lines) for (const v of l.values) if (v !== null && v > max) max = v;
  if (!opts.max) max = niceCeil(max || 1);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = css("--muted");
  ctx.strokeStyle = css("--line");
  ctx.lineWidth = 1;
  for (let i = 0; i <= 2; i++) {
    const y = top + ph - (ph * i) / 2;
    ctx.beginPath(); ctx.moveTo(left, y + 0.5); ctx.lineTo(left + pw, y + 0.5); ctx.stroke();
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(num((max * i) / 2, max >= 20 ? 0 : 1), left - 4, y);
  }
  ctx.textAlign = "left"; ctx.textBaseline = "top";
  ctx.fillText("−5 min", left, top + ph + 4);
  ctx.textAlign = "right";
  ctx.fillText("now", left + pw, top + ph + 4);
  if (!t.length) return;
  const now = t[t.length - 1], span = 300;
  const x = (ti) => left + pw - ((now - ti) / span) * pw;
  const y = (v) => top + ph - (Math.min(v, max) / max) * ph;
  for (const l of lines) {
    ctx.strokeStyle = l.color;
    ctx.lineWidth = 1.6;
    ctx.beginPath();
    let pen = false;
    for (let i = 0; i < t.length; i++) {
      const v = l.values[i];
      if (v === null || v === undefined || now - t[i] > span) { pen = false; continue; }
      if (pen) ctx.lineTo(x(t[i]), y(v)); else ctx.moveTo(x(t[i]), y(v));
      pen = true;
    }
    ctx.stroke();
  }
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

// ---- block map --------------------------------------------------------------

// One cell per block while they fit at 3 px or more; past that one cell stands
// for several blocks and shows the busiest state among them.
function drawBlocks(canvas, blocks) {
  const { ctx, w, h } = fitCanvas(canvas);
  const colors = [css("--free"), css("--cached"), css("--used"), css("--shared")];
  const n = blocks.map.length;
  if (!n) return;
  const maxCells = Math.floor((w * h) / 9);
  const per = Math.max(1, Math.ceil(n / maxCells));
  const cells = Math.ceil(n / per);
  let size = Math.floor(Math.sqrt((w * h) / cells));
  size = Math.max(3, Math.min(size, 16));
  let cols = Math.max(1, Math.floor(w / size));
  while (Math.ceil(cells / cols) * size > h && size > 3) { size--; cols = Math.floor(w / size); }
  const gap = size >= 6 ? 1 : 0;
  for (let c = 0; c < cells; c++) {
    let state = 0;
    for (let b = c * per; b < Math.min(n, (c + 1) * per); b++) {
      const s = blocks.map.charCodeAt(b) - 48;
      if (rank(s) > rank(state)) state = s;
    }
    ctx.fillStyle = colors[state] || colors[0];
    ctx.fillRect((c % cols) * size, Math.floor(c / cols) * size, size - gap, size - gap);
  }
  canvas.dataset.free = blocks.free;
  canvas.dataset.cached = blocks.cached;
  canvas.dataset.inUse = blocks.in_use;
  canvas.dataset.shared = blocks.shared;
  canvas.dataset.blocksPerCell = per;
}
function rank(s) { return [0, 1, 3, 2][s] || 0; } // in use and shared above cached above free

// ---- polling ----------------------------------------------------------------

function setText(id, text) { $(id).textContent = text; }

function render(s) {
  latest = s;
  setText("model", s.model);
  setText("arch", s.architecture + " · " + s.task);
  const status = $("status");
  status.textContent = s.alive ? "serving" : "engine stopped";
  status.className = "pill " + (s.alive ? "ok" : "bad");
  setText("uptime", duration(s.uptime_s));
  const hst = s.history, now = s.now;
  setText("running", now.running);
  setText("waiting", now.waiting);
  setText("gen-tps", num(last(hst.generation_tokens_per_s) || 0));
  setText("prefill-tps", num(last(hst.prefill_tokens_per_s) || 0));
  const lat = s.latency || {};
  const pair = (l) => (l && l.count ? latencyPair(l.p50_s, l.p95_s) : "–");
  setText("ttft", pair(lat.ttft));
  setText("itl", pair(lat.itl));
  setText("kv-usage", pct(now.kv_cache_usage));
  setText("prefix-hit", now.prefix_cache_queries_total
    ? pct(now.prefix_cache_hits_total / now.prefix_cache_queries_total) : (s.config.prefix_caching ? "–" : "off"));
  setText("preemptions", num(now.preemptions_total, 0));
  setText("gen-total", num(now.generation_tokens_total, 0));
  setText("finished", num(now.requests_finished_total, 0));
  const c1 = css("--c1"), c2 = css("--c2");
  drawChart($("chart-tokens"), hst.t, [
    { values: hst.prefill_tokens_per_s, color: c2 },
    { values: hst.generation_tokens_per_s, color: c1 },
  ], {});
  drawChart($("chart-requests"), hst.t, [
    { values: hst.waiting, color: c2 },
    { values: hst.running, color: c1 },
  ], {});
  const toMs = (xs) => xs.map((v) => (v === null ? null : v * 1000));
  drawChart($("chart-latency"), hst.t, [
    { values: toMs(hst.ttft_mean_s), color: c2 },
    { values: toMs(hst.itl_mean_s), color: c1 },
  ], {});
  const toPct = (xs) => xs.map((v) => (v === null ? null : v * 100));
  drawChart($("chart-cache"), hst.t, [
    { values: toPct(hst.prefix_cache_hit_rate), color: c2 },
    { values: toPct(hst.kv_cache_usage), color: c1 },
  ], { max: 100 });
  const cfg = s.config;
  setText("blocks-caption", cfg.num_blocks + " blocks of " + cfg.block_size + " tokens · " +
    cfg.kv_cache_dtype + " · " + bytes(cfg.kv_cache_bytes) +
    (cfg.prefix_caching ? " · prefix caching on" : ""));
  if (s.blocks) {
    drawBlocks($("blockmap"), s.blocks);
    setText("blocks-free", num(s.blocks.free, 0));
    setText("blocks-cached", num(s.blocks.cached, 0));
    setText("blocks-in-use", num(s.blocks.in_use, 0));
    setText("blocks-shared", num(s.blocks.shared, 0));
  }
  syncModes(s);
}

function showError(text) {
  const b = $("error-banner");
  b.hidden = !text;
  b.textContent = text || "";
}

async function poll() {
  clearTimeout(pollTimer);
  try {
    const r = await fetch("/v1/engine/stats", { headers: headers(), cache: "no-store" });
    if (r.status === 401) {
      $("auth-banner").hidden = false;
      $("status").textContent = "API key needed";
      $("status").className = "pill bad";
      $("api-key").focus();
      return; // until a key is entered
    }
    $("auth-banner").hidden = true;
    if (!r.ok) throw new Error(await errorText(r));
    render(await r.json());
    showError("");
  } catch (e) {
    showError("Cannot read the engine's stats: " + e.message);
    $("status").textContent = "unreachable";
    $("status").className = "pill bad";
  }
  pollTimer = setTimeout(poll, 1000);
}

async function errorText(r) {
  try {
    const body = await r.json();
    return (body.error && body.error.message) || r.status + " " + r.statusText;
  } catch (_) {
    return r.status + " " + r.statusText;
  }
}

// ---- playground -------------------------------------------------------------

const chatHistory = []; // the chat so far: {role, content}
let controller = null;

function syncModes(s) {
  const mode = $("mode");
  const chat = mode.querySelector("option[value=chat]");
  chat.disabled = !s.chat;
  if (!s.chat && mode.value === "chat") mode.value = "completion";
  const generates = s.task === "generate";
  $("send").disabled = !generates || controller !== null;
  if (!generates) setText("play-status", "this model serves embeddings: use /v1/embeddings");
}

function addMessage(cls, text) {
  const div = document.createElement("div");
  div.className = "msg " + cls;
  div.textContent = text;
  $("transcript").appendChild(div);
  $("transcript").scrollTop = $("transcript").scrollHeight;
  return div;
}

// Reads an SSE body, calling `onData` with each parsed `data:` payload.
async function readSse(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(ev) {
  ev.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  const chat = $("mode").value === "chat";
  const body = {
    model: latest ? latest.model : undefined,
    max_tokens: parseInt($("max-tokens").value, 10) || 128,
    temperature: parseFloat($("temperature").value) || 0,
    stream: true,
    stream_options: { include_usage: true },
  };
  let out;
  if (chat) {
    chatHistory.push({ role: "user", content: text });
    body.messages = chatHistory.slice();
    addMessage("user", text);
    out = addMessage("assistant", "");
  } else {
    body.prompt = text;
    out = addMessage("assistant", "");
    const p = document.createElement("span");
    p.className = "prompt";
    p.textContent = text;
    out.appendChild(p);
  }
  $("prompt").value = "";
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let first = null, tokens = 0, answer = "";
  setText("play-status", "waiting for the first token…");
  try {
    const r = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!r.ok) throw new Error(await errorText(r));
    await readSse(r, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const c = chunk.choices && chunk.choices[0];
      const piece = c ? (chat ? (c.delta && c.delta.content) || "" : c.text || "") : "";
      if (piece) {
        if (first === null) first = performance.now();
        answer += piece;
        out.appendChild(document.createTextNode(piece));
        $("transcript").scrollTop = $("transcript").scrollHeight;
      }
    });
    if (chat) chatHistory.push({ role: "assistant", content: answer });
    const secs = (performance.now() - (first || started)) / 1000;
    setText("play-status", "done: " + tokens + " tokens, first after " +
      ms(((first || performance.now()) - started) / 1000) + " ms, " +
      num(tokens > 1 && secs > 0 ? (tokens - 1) / secs : 0) + " tokens/s");
  } catch (e) {
    if (chat && chatHistory.length && chatHistory[chatHistory.length - 1].role === "user") chatHistory.pop();
    if (e.name === "AbortError") {
      setText("play-status", "stopped");
    } else {
      addMessage("error", e.message);
      setText("play-status", "failed");
    }
  } finally {
    controller = null;
    $("stop").disabled = true;
    $("send").disabled = false;
  }
}

// ---- wiring -----------------------------------------------------------------

$("api-key").value = apiKey;
$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  apiKey = $("api-key").value.trim();
  if (apiKey) localStorage.setItem(KEY_STORE, apiKey); else localStorage.removeItem(KEY_STORE);
  poll();
});
$("play-form").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("play-form").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => { chatHistory.length = 0; $("transcript").textContent = ""; setText("play-status", ""); });
window.addEventListener("resize", () => latest && render(latest));
poll();
