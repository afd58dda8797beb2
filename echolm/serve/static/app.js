// Echo's page: plain JavaScript, no build step, no CDN. Talks to the same server's
// OpenAI-compatible API (/v1/...) and, for ranking, to /api/samples and /api/rankings.
"use strict";

const $ = (sel) => document.querySelector(sel);
const STORY = {
  base: ["Pretrained", "Read raw text and learned to continue it. It has never seen a conversation."],
  sft: ["Supervised fine-tuning", "Imitated example conversations: it learned the chat format and to stop."],
  rl: ["Reinforcement learning", "Practised checkable tasks and was rewarded for correct answers."],
  rlhf: ["RLHF", "Optimised against a reward model trained on people's rankings."],
  dpo: ["DPO", "Learned from the same rankings directly, without a reward model."],
};
const PREFERRED = ["rlhf", "rl", "sft", "dpo", "base"];
const state = { stages: [], health: null, chat: [], busy: false, abort: null, rank: null, order: [] };

// ---- helpers ------------------------------------------------------------------------------
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function toast(msg, bad = false) {
  const t = $("#toast");
  t.textContent = msg;
  t.classList.toggle("bad", bad);
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, bad ? 6000 : 3500);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function post(path, body, signal) {
  const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!r.ok) {
    let msg = r.statusText;
    try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(`${r.status}: ${msg}`);
  }
  return r;
}

function sampling() {
  const s = {
    temperature: Number($("#temperature").value),
    top_p: Number($("#top-p").value),
    max_tokens: Math.min(Math.max(1, parseInt($("#max-tokens").value, 10) || 96),
                         Number($("#max-tokens").max) || 1e9),
  };
  const seed = $("#seed").value.trim();
  if (seed !== "") s.seed = parseInt(seed, 10);
  return s;
}

function modelOf(stage) { return "echo-" + stage; }

// Server-sent events from a fetch response: yields each JSON payload until [DONE].
async function* events(resp) {
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        yield obj;
      }
    }
  }
}

// Stream one chat answer; onToken(text, logprobEntries) for every chunk.
async function streamChat(stage, messages, onChunk, signal, extra = {}) {
  const t0 = performance.now();
  const body = { model: modelOf(stage), messages, stream: true,
                 stream_options: { include_usage: true }, ...sampling(), ...extra };
  const resp = await post("/v1/chat/completions", body, signal);
  let finish = null, tokens = 0, first = null;
  for await (const chunk of events(resp)) {
    if (chunk.usage) tokens = chunk.usage.completion_tokens;
    for (const c of chunk.choices || []) {
      const text = (c.delta && c.delta.content) || "";
      const lps = (c.logprobs && c.logprobs.content) || [];
      if ((text || lps.length) && first === null) first = performance.now() - t0;
      onChunk(text, lps);
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  return { finish, tokens, ms: performance.now() - t0, first };
}

function describe(r) {
  const secs = r.ms / 1000;
  const why = r.finish === "length" ? "hit the length limit" : "ended its answer";
  return `${r.tokens} tokens · ${secs.toFixed(1)} s · ${why}`;
}

// ---- tabs and settings -------------------------------------------------------------------
function setMode(mode) {
  for (const b of document.querySelectorAll(".tabs button")) {
    b.setAttribute("aria-selected", String(b.dataset.mode === mode));
  }
  for (const s of document.querySelectorAll("section.mode")) s.hidden = s.dataset.mode !== mode;
  $(".stage-pick").style.visibility = mode === "compare" ? "hidden" : "visible";
  if (location.hash !== "#" + mode) history.replaceState(null, "", "#" + mode);
}

function bindSettings() {
  for (const [id, out] of [["#temperature", "#temperature-out"], ["#top-p", "#top-p-out"]]) {
    const update = () => { $(out).textContent = Number($(id).value).toFixed(2); };
    $(id).addEventListener("input", update);
    update();
  }
  const key = localStorage.getItem("echo.key");
  if (key) $("#api-key").value = key;
  $("#api-key").addEventListener("change", () => localStorage.setItem("echo.key", $("#api-key").value));
  $("#annotator").value = localStorage.getItem("echo.annotator") || "";
  $("#annotator").addEventListener("change", () => localStorage.setItem("echo.annotator", $("#annotator").value.trim()));
  $("#stage").addEventListener("change", () => {
    $("#base-note").hidden = $("#stage").value !== "base";
  });
  document.addEventListener("click", (e) => {
    if (!$("#knobs").contains(e.target)) $("#knobs").open = false;
  });
  for (const b of document.querySelectorAll(".tabs button")) {
    b.addEventListener("click", () => setMode(b.dataset.mode));
  }
}

async function loadHealth() {
  const h = await (await fetch("/health")).json();
  state.health = h;
  state.stages = h.models.map((m) => m.replace(/^echo-/, ""));
  const sel = $("#stage");
  sel.textContent = "";
  for (const s of state.stages) {
    const o = el("option", "", `${s} — ${STORY[s] ? STORY[s][0] : s}`);
    o.value = s;
    sel.append(o);
  }
  sel.value = PREFERRED.find((s) => state.stages.includes(s)) || state.stages[0];
  $("#base-note").hidden = sel.value !== "base";
  const cap = h.limits.max_tokens;
  $("#max-tokens").max = cap;
  if (Number($("#max-tokens").value) > cap) $("#max-tokens").value = cap;
  if (h.auth) {
    $("#key-row").hidden = false;
    if (!$("#api-key").value) { $("#knobs").open = true; toast("This server needs an API key (Sampling ▾)."); }
  }
  buildColumns();
}

// ---- chat ---------------------------------------------------------------------------------
function addMessage(role, text, meta = "") {
  $("#chat-empty").hidden = true;
  const m = el("div", "msg " + role);
  const b = el("div", "bubble", text);
  const info = el("div", "meta", meta);
  m.append(b, info);
  $("#messages").append(m);
  $("#messages").scrollTop = $("#messages").scrollHeight;
  return { m, b, info };
}

async function sendChat(e) {
  e.preventDefault();
  if (state.busy) return;
  const text = $("#chat-input").value.trim();
  if (!text) return;
  $("#chat-input").value = "";
  const stage = $("#stage").value;
  addMessage("user", text);
  state.chat.push({ role: "user", content: text });
  const messages = [];
  const system = $("#system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.chat);
  const out = addMessage("assistant", "", stage);
  out.b.classList.add("cursor");
  state.busy = true;
  state.abort = new AbortController();
  $("#chat-send").hidden = true;
  $("#chat-stop").hidden = false;
  let answer = "";
  try {
    const r = await streamChat(stage, messages, (t) => {
      answer += t;
      out.b.textContent = answer;
      $("#messages").scrollTop = $("#messages").scrollHeight;
    }, state.abort.signal);
    out.info.textContent = `${stage} · ${describe(r)}`;
    state.chat.push({ role: "assistant", content: answer });
  } catch (err) {
    if (err.name === "AbortError") {
      out.info.textContent = `${stage} · stopped`;
      if (answer) state.chat.push({ role: "assistant", content: answer });
      else state.chat.pop();
    } else {
      out.m.classList.add("error");
      out.b.textContent = err.message;
      state.chat.pop();
    }
  } finally {
    out.b.classList.remove("cursor");
    if (!out.b.textContent) out.b.textContent = "(empty answer)";
    state.busy = false;
    $("#chat-send").hidden = false;
    $("#chat-stop").hidden = true;
    $("#chat-input").focus();
  }
}

function bindChat() {
  $("#chat-form").addEventListener("submit", sendChat);
  $("#chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); }
  });
  $("#chat-stop").addEventListener("click", () => state.abort && state.abort.abort());
  $("#chat-new").addEventListener("click", () => {
    if (state.abort) state.abort.abort();
    state.chat = [];
    for (const m of document.querySelectorAll("#messages .msg")) m.remove();
    $("#chat-empty").hidden = false;
  });
}

// ---- compare ------------------------------------------------------------------------------
function buildColumns() {
  const cols = $("#compare-cols");
  cols.textContent = "";
  state.stages.forEach((s, i) => {
    const c = el("article", "col");
    c.dataset.stage = s;
    const head = el("header");
    const h = el("h3", "", s);
    h.append(el("span", "badge", `${i + 1}. ${STORY[s] ? STORY[s][0] : s}`));
    head.append(h, el("p", "story", STORY[s] ? STORY[s][1] : ""));
    const out = el("div", "out muted", "Waiting for a prompt.");
    const foot = el("footer", "", "");
    c.append(head, out, foot);
    cols.append(c);
  });
}

async function runCompare(e) {
  e.preventDefault();
  const text = $("#compare-input").value.trim();
  if (!text) return;
  const seed = $("#seed").value.trim() === "" ? Math.floor(Math.random() * 1e9) : undefined;
  $("#compare-go").disabled = true;
  const jobs = [...document.querySelectorAll("#compare-cols .col")].map(async (c) => {
    const out = c.querySelector(".out"), foot = c.querySelector("footer");
    out.textContent = "";
    out.classList.remove("muted");
    out.classList.add("cursor");
    foot.textContent = "";
    let answer = "";
    try {
      const extra = seed === undefined ? {} : { seed };
      const r = await streamChat(c.dataset.stage, [{ role: "user", content: text }], (t) => {
        answer += t;
        out.textContent = answer;
      }, undefined, extra);
      if (!answer) out.textContent = "(empty answer)";
      foot.textContent = describe(r);
    } catch (err) {
      out.textContent = err.message;
      foot.textContent = "failed";
    } finally {
      out.classList.remove("cursor");
    }
  });
  await Promise.all(jobs);
  $("#compare-go").disabled = false;
}

// ---- rank ---------------------------------------------------------------------------------
async function refreshCounts() {
  try {
    const r = await fetch("/api/prefs", { headers: headers() });
    if (!r.ok) return;
    const c = (await r.json()).counts;
    $("#rank-status").textContent = `The preference store holds ${c.rankings} ranking${c.rankings === 1 ? "" : "s"} over ${c.prompts} prompt${c.prompts === 1 ? "" : "s"}.`;
  } catch (e) { /* offline or no key yet */ }
}

async function sampleRank(e) {
  e.preventDefault();
  const who = $("#annotator").value.trim();
  if (!who) { toast("Type your name first: it is stored with the ranking.", true); $("#annotator").focus(); return; }
  localStorage.setItem("echo.annotator", who);
  const prompt = $("#rank-prompt").value.trim();
  if (!prompt) { $("#rank-prompt").focus(); return; }
  const s = sampling();
  if (s.temperature === 0) toast("Temperature 0 gives the same answer every time: raise it to get different answers.", true);
  const body = { model: modelOf($("#stage").value), prompt, n: parseInt($("#rank-k").value, 10),
                 temperature: s.temperature, top_p: s.top_p, max_tokens: s.max_tokens };
  if (s.seed !== undefined) body.seed = s.seed;
  $("#rank-sample").disabled = true;
  $("#rank-cards").textContent = "";
  $("#rank-actions").hidden = true;
  $("#rank-status").textContent = `Sampling ${body.n} answers from ${$("#stage").value}…`;
  try {
    const r = await (await post("/api/samples", body)).json();
    state.rank = r;
    state.order = [];
    renderCards();
    $("#rank-status").textContent = `${r.responses.length} answers from ${r.stage} (${r.checkpoint}). Click them from best to worst.`;
    $("#rank-actions").hidden = false;
  } catch (err) {
    $("#rank-status").textContent = "";
    toast(err.message, true);
  } finally {
    $("#rank-sample").disabled = false;
  }
}

function renderCards() {
  const cards = $("#rank-cards");
  cards.textContent = "";
  state.rank.responses.forEach((resp, i) => {
    const letter = String.fromCharCode(65 + i);
    const place = state.order.indexOf(resp.id);
    const b = el("div", "card" + (place >= 0 ? " ranked" : ""));
    b.setAttribute("role", "button");
    b.tabIndex = 0;
    b.dataset.id = resp.id;
    b.setAttribute("aria-label", `Answer ${letter}` + (place >= 0 ? `, ranked ${place + 1}` : ""));
    const top = el("div", "card-top");
    top.append(el("span", "slot", place >= 0 ? String(place + 1) : ""),
               el("span", "letter", `Answer ${letter}`),
               el("span", "card-hint", place >= 0 ? (place === 0 ? "best" : "") : "click to rank"));
    b.append(top, el("div", "card-text", resp.text || "(empty answer)"));
    const toggle = () => {
      const k = state.order.indexOf(resp.id);
      if (k >= 0) state.order.splice(k, 1); else state.order.push(resp.id);
      renderCards();
    };
    b.addEventListener("click", toggle);
    b.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); toggle(); }
    });
    cards.append(b);
  });
  const n = state.rank.responses.length;
  $("#rank-save").disabled = state.order.length < n;
  $("#rank-save").textContent = state.order.length < n ? `Save ranking (${state.order.length}/${n})` : "Save ranking";
}

async function saveRank() {
  if (!state.rank) return;
  const body = { prompt_id: state.rank.prompt_id, response_ids: state.order, annotator: $("#annotator").value.trim() };
  $("#rank-save").disabled = true;
  try {
    const r = await (await post("/api/rankings", body)).json();
    toast(`Saved ranking #${r.ranking_id}. The store now holds ${r.counts.rankings} ranking${r.counts.rankings === 1 ? "" : "s"} for echolm rm.`);
    $("#rank-status").textContent = `Saved. The preference store holds ${r.counts.rankings} ranking${r.counts.rankings === 1 ? "" : "s"} over ${r.counts.prompts} prompt${r.counts.prompts === 1 ? "" : "s"}.`;
    $("#rank-actions").hidden = true;
    for (const c of document.querySelectorAll(".card")) c.classList.add("saved");
    state.rank = null;
  } catch (err) {
    toast(err.message, true);
    $("#rank-save").disabled = false;
  }
}

function bindRank() {
  $("#rank-form").addEventListener("submit", sampleRank);
  $("#rank-reset").addEventListener("click", () => { state.order = []; renderCards(); });
  $("#rank-save").addEventListener("click", saveRank);
}

// ---- tokens -------------------------------------------------------------------------------
function colour(p) {
  const hue = 120 * Math.pow(p, 0.6);
  return `hsl(${hue.toFixed(0)} 70% 82%)`;
}

function shown(token) {
  return token.replace(/\n/g, "⏎\n").replace(/\t/g, "⇥");
}

function detailHTML(entry, into) {
  into.textContent = "";
  const p = Math.exp(entry.logprob);
  into.append(el("h4", "", JSON.stringify(entry.token)));
  into.append(el("p", "sub", `chosen with probability ${(100 * p).toFixed(1)}% (the model's own distribution, temperature 1)`));
  into.append(el("p", "sub", "The likeliest tokens at this point:"));
  const alts = entry.top_logprobs.length ? entry.top_logprobs : [entry];
  for (const a of alts) {
    const q = Math.exp(a.logprob);
    const row = el("div", "alt" + (a.token === entry.token ? " chosen" : ""));
    row.append(el("span", "name", JSON.stringify(a.token)), el("span", "p", `${(100 * q).toFixed(1)}%`));
    const bar = el("div", "bar");
    const fill = el("span");
    fill.style.width = `${Math.max(1, 100 * q).toFixed(1)}%`;
    bar.append(fill);
    row.append(bar);
    into.append(row);
  }
}

async function runTokens(e) {
  e.preventDefault();
  const text = $("#tokens-input").value.trim();
  if (!text) return;
  const view = $("#token-text");
  view.textContent = "";
  $("#token-detail").innerHTML = '<p class="muted">Hover or click a token.</p>';
  $("#tokens-go").disabled = true;
  $("#tokens-stats").textContent = "";
  let n = 0, sum = 0;
  try {
    const r = await streamChat($("#stage").value, [{ role: "user", content: text }], (_t, lps) => {
      for (const entry of lps) {
        const p = Math.exp(entry.logprob);
        n += 1; sum += p;
        const s = el("span", "tok", shown(entry.token));
        s.style.background = colour(p);
        s.dataset.p = p.toFixed(4);
        s.addEventListener("mouseenter", (ev) => showTip(entry, ev));
        s.addEventListener("mousemove", moveTip);
        s.addEventListener("mouseleave", () => { $("#tip").hidden = true; });
        s.addEventListener("click", () => {
          for (const x of document.querySelectorAll(".tok.pinned")) x.classList.remove("pinned");
          s.classList.add("pinned");
          detailHTML(entry, $("#token-detail"));
        });
        view.append(s);
      }
    }, undefined, { logprobs: true, top_logprobs: 5 });
    if (!n) view.innerHTML = '<span class="muted">(empty answer)</span>';
    $("#tokens-stats").textContent = `mean probability ${n ? (100 * sum / n).toFixed(0) : 0}% · ${describe(r)}`;
    const first = view.querySelector(".tok");
    if (first) first.click();
  } catch (err) {
    toast(err.message, true);
  } finally {
    $("#tokens-go").disabled = false;
  }
}

function showTip(entry, ev) {
  const tip = $("#tip");
  detailHTML(entry, tip);
  tip.hidden = false;
  moveTip(ev);
}

function moveTip(ev) {
  const tip = $("#tip");
  const x = Math.min(ev.clientX + 14, window.innerWidth - 260);
  const y = Math.min(ev.clientY + 16, window.innerHeight - tip.offsetHeight - 10);
  tip.style.left = `${x}px`;
  tip.style.top = `${y}px`;
}

function bindTokens() {
  $("#tokens-form").addEventListener("submit", runTokens);
}

// ---- start --------------------------------------------------------------------------------
function submitOnEnter(area, form) {
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); form.requestSubmit(); }
  });
}

async function main() {
  bindSettings();
  bindChat();
  bindRank();
  bindTokens();
  $("#compare-form").addEventListener("submit", runCompare);
  submitOnEnter($("#compare-input"), $("#compare-form"));
  submitOnEnter($("#tokens-input"), $("#tokens-form"));
  submitOnEnter($("#rank-prompt"), $("#rank-form"));
  const mode = location.hash.slice(1);
  setMode(["chat", "compare", "rank", "tokens"].includes(mode) ? mode : "chat");
  try {
    await loadHealth();
    refreshCounts();
    document.body.dataset.ready = "1";
  } catch (err) {
    toast("Cannot reach the server: " + err.message, true);
  }
}

main();
