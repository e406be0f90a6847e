// pretag playground: builds tag controls from GET /v1/policy, streams POST /v1/completions (server-sent events
// read through fetch, since EventSource cannot POST), colours each token by its temptation and draws an SVG chart.
// Plain JS, no build step, nothing loaded from outside the server.
"use strict";

const $ = (id) => document.getElementById(id);
// A series' colour says what its tag means: the schema's bad tags in warm colours (the first red), the others in
// cool ones (the first blue), so the `bad` line is red and the `good` one blue whatever the schema's tag order.
const BAD_COLORS = ["#dc2626", "#ea580c", "#db2777", "#ca8a04"];
const OTHER_COLORS = ["#2563eb", "#16a34a", "#9333ea", "#0891b2"];
function tagColor(tag) {
  const bad = state.info.bad_tags.includes(tag);
  const group = state.info.tags.filter((t) => state.info.bad_tags.includes(t) === bad);
  const colors = bad ? BAD_COLORS : OTHER_COLORS;
  return colors[group.indexOf(tag) % colors.length];
}
const state = { info: null, tokens: [], alarms: [], policy: null, abort: null };

async function init() {
  const r = await fetch("/v1/policy");
  state.info = await r.json();
  const op = state.info.operator;
  $("model-info").textContent = `schema ${state.info.schema} · ${state.info.tags.length} tags` +
    (op.ban.length ? ` · operator bans ${op.ban.join(", ")}` : "");
  $("max-tokens").max = state.info.limits.max_new_tokens;
  $("max-tokens").value = Math.min(48, state.info.limits.max_new_tokens);
  $("stop-on-alarm").checked = op.stop_on_alarm;
  $("stop-on-alarm").disabled = op.stop_on_alarm;
  const body = document.querySelector("#tags tbody");
  for (const tag of state.info.tags) {
    const locked = op.ban.includes(tag);
    const tr = document.createElement("tr");
    tr.dataset.tag = tag;
    if (locked) tr.className = "locked";
    const opAlarm = op.alarms[tag];
    tr.innerHTML = `<td class="name"></td>
      <td><select class="mode" aria-label="control for ${tag}">
        <option value="allow">allow</option><option value="ban">ban</option><option value="bias">bias</option>
      </select></td>
      <td><input class="bias" type="number" step="0.5" value="0" disabled aria-label="bias for ${tag}"></td>
      <td><input class="alarm-at" type="number" min="0" max="1" step="0.01" aria-label="alarm threshold for ${tag}"
        placeholder="${opAlarm ?? "off"}"></td>`;
    tr.querySelector(".name").textContent = tag + (locked ? " (operator)" : "");
    const mode = tr.querySelector(".mode");
    if (locked) { mode.value = "ban"; mode.disabled = true; }
    if (opAlarm !== undefined) tr.querySelector(".alarm-at").max = opAlarm;
    mode.addEventListener("change", () => { tr.querySelector(".bias").disabled = mode.value !== "bias"; });
    body.appendChild(tr);
  }
  $("generate").disabled = false;
}

function requestPolicy() {
  const p = { ban: [], bias: {}, alarms: {} };
  if ($("stop-on-alarm").checked) p.stop_on_alarm = true;
  for (const tr of document.querySelectorAll("#tags tbody tr")) {
    const tag = tr.dataset.tag;
    if (tr.classList.contains("locked")) continue; // the operator's ban applies anyway
    const mode = tr.querySelector(".mode").value;
    if (mode === "ban") p.ban.push(tag);
    if (mode === "bias") p.bias[tag] = parseFloat(tr.querySelector(".bias").value || "0");
    const a = tr.querySelector(".alarm-at").value;
    if (a !== "") p.alarms[tag] = parseFloat(a);
  }
  return p;
}

// The tags whose temptation colours the text: alarmed or banned tags, else the schema's bad tags, else all.
function watchedTags() {
  const pol = state.policy || { ban: [], alarms: {} };
  const w = [...new Set([...pol.ban, ...Object.keys(pol.alarms)])];
  if (w.length) return w;
  return state.info.bad_tags.length ? state.info.bad_tags : state.info.tags;
}

function tokenColor(tok) {
  const pol = state.policy || { alarms: {} };
  let t = 0;
  for (const tag of watchedTags()) {
    const ref = pol.alarms[tag] > 0 ? pol.alarms[tag] : 0.5;  // colour relative to the alarm, else to 0.5
    t = Math.max(t, Math.min(1, (tok.temptation[tag] ?? 0) / ref));
  }
  return `hsl(${Math.round(120 * (1 - t))}, 75%, ${Math.round(92 - 22 * t)}%)`;
}

function addToken(tok) {
  state.tokens.push(tok);
  const span = document.createElement("span");
  span.className = "tok" + (tok.tag ? " tag" : "") + (tok.alarms && tok.alarms.length ? " alarmed" : "");
  span.textContent = tok.text;
  span.style.background = tokenColor(tok);
  span.title = Object.entries(tok.temptation).map(([k, v]) => `${k}: ${v.toExponential(2)}`).join("\n") +
    (tok.verdict ? "\nverdict (share of the tags): " +
      Object.entries(tok.verdict).map(([k, v]) => `${k} ${v.toFixed(3)}`).join(", ") : "");
  $("output").appendChild(span);
  for (const a of tok.alarms || []) showAlarm(a, tok.index);
  drawChart();
}

function showAlarm(a, index) {
  state.alarms.push(a);
  const el = $("alarm");
  el.hidden = false;
  const what = a.tag !== undefined
    ? `${a.reading === "verdict" ? "verdict" : "temptation"} for "${a.tag}" was ${a.p.toExponential(2)} > ` +
      `${a.threshold} at token ${index}`
    : `rule ${a.rule} fired at token ${index}`;
  el.textContent = `⚠ Alarm (${a.source}, ${a.action}): ${what}` +
    (state.alarms.length > 1 ? ` · ${state.alarms.length} alarms` : "");
}

// Temptations span orders of magnitude (1e-4 from an untempted model, 0.5 when it wants the tag), so the y axis
// is log10: one gridline per decade, from the smallest value seen (at least 1e-6) up to 1.
function drawChart() {
  const svg = $("chart"), W = 640, H = 220, L = 40, B = 20, T = 8, R = 8;
  const tags = state.info.tags, n = Math.max(state.tokens.length, 2);
  const pol = state.policy || { alarms: {} };
  let lo = 1;
  for (const tok of state.tokens) for (const tag of tags) if (tok.temptation[tag] > 0) lo = Math.min(lo, tok.temptation[tag]);
  for (const th of Object.values(pol.alarms)) lo = Math.min(lo, th);
  const dmin = Math.max(-6, Math.min(-1, Math.floor(Math.log10(lo))));
  const x = (i) => L + (W - L - R) * (i / (n - 1));
  const y = (p) => T + (H - B - T) * (Math.log10(Math.max(p, 10 ** dmin)) / dmin);
  const parts = [`<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#999"/>`,
    `<line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="#999"/>`,
    `<text x="${W - R - 70}" y="${H - 4}" font-size="10">token ${state.tokens.length}</text>`];
  for (let d = 0; d >= dmin; d--) {
    parts.push(`<line x1="${L}" x2="${W - R}" y1="${y(10 ** d)}" y2="${y(10 ** d)}" stroke="#eee"/>`,
      `<text x="2" y="${y(10 ** d) + 4}" font-size="10">1e${d}</text>`);
  }
  tags.forEach((tag) => {
    const color = tagColor(tag);
    const th = pol.alarms[tag];
    if (th !== undefined) {
      parts.push(`<line class="threshold" data-tag="${tag}" x1="${L}" x2="${W - R}" y1="${y(th)}" y2="${y(th)}"
        stroke="${color}" stroke-dasharray="5 3"/>`);
    }
    if (!state.tokens.length) return;
    const pts = state.tokens.map((tok, i) => `${x(i).toFixed(1)},${y(tok.temptation[tag] ?? 0).toFixed(1)}`);
    parts.push(`<polyline class="series" data-tag="${tag}" fill="none" stroke="${color}" stroke-width="1.5"
      points="${pts.join(" ")}"/>`);
  });
  svg.innerHTML = parts.join("");
  $("legend").innerHTML = tags.map((tag) =>
    `<span><i style="background:${tagColor(tag)}"></i>${tag}</span>`).join("") +
    `<span class="muted small">log scale; dashed: alarm thresholds</span>`;
}

function reset() {
  state.tokens = []; state.alarms = []; state.policy = null;
  $("output").textContent = ""; $("alarm").hidden = true; $("alarm").textContent = "";
  $("error").hidden = true; $("error").textContent = "";
  drawChart();
}

function showError(msg) { $("error").hidden = false; $("error").textContent = msg; }

async function generate() {
  reset();
  const prompt = $("prompt").value;
  const seed = $("seed").value;
  const body = {
    prompt, stream: true, max_new_tokens: parseInt($("max-tokens").value, 10),
    temperature: parseFloat($("temperature").value), policy: requestPolicy(),
  };
  if (seed !== "") body.seed = parseInt(seed, 10);
  const pspan = document.createElement("span");
  pspan.className = "prompt"; pspan.textContent = prompt;
  $("output").appendChild(pspan);
  state.abort = new AbortController();
  $("generate").disabled = true; $("stop").disabled = false; $("status").textContent = "waiting…";
  try {
    const r = await fetch("/v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: state.abort.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({ error: r.statusText }));
      showError(`${r.status}: ${err.error}`);
      $("status").textContent = "rejected";
      return;
    }
    await readEvents(r.body.getReader());
  } catch (e) {
    if (e.name !== "AbortError") showError(String(e));
    else $("status").textContent = "stopped";
  } finally {
    $("generate").disabled = false; $("stop").disabled = true; state.abort = null;
  }
}

async function readEvents(reader) {
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      handle(event, JSON.parse(data));
    }
  }
}

function handle(event, data) {
  if (event === "start") {
    state.policy = data.policy;
    $("status").textContent = "streaming…";
    drawChart();
  } else if (event === "token") {
    addToken(data);
    $("status").textContent = `streaming… ${state.tokens.length} tokens`;
  } else if (event === "done") {
    $("status").textContent = `done: ${data.n_tokens} tokens, ${data.finish_reason}` +
      (data.alarms.length ? `, ${data.alarms.length} alarm(s)` : "");
  } else if (event === "error") {
    showError(`${data.status}: ${data.error}`);
    $("status").textContent = "error";
  }
}

$("generate").disabled = true;
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => state.abort && state.abort.abort());
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
init().catch((e) => showError("could not load /v1/policy: " + e));
