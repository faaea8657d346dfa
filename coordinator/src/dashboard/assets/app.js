// The dashboard: asks for a key when the coordinator wants one, follows
// /dashboard/api/events (server-sent events read with fetch, so the key
// travels in the authorization header, never in a URL) and redraws on
// every snapshot.

import { lineChart, format } from "./chart.js";
import { drawAudit, drawFleet, drawModels, el } from "./fleet.js";
import { drawForecasts } from "./forecast.js";

const STORE = "talon.dashboard.key";
const RETRY_MS = 2000;
const $ = (id) => document.getElementById(id);

// a key in the fragment (talon up prints such a link) moves to the tab's
// session storage and out of the address bar
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("key")) {
  sessionStorage.setItem(STORE, fragment.get("key"));
  history.replaceState(null, "", location.pathname);
}

let key = sessionStorage.getItem(STORE) ?? "";
let updates = 0;

function headers() {
  return key ? { authorization: `Bearer ${key}` } : {};
}

function live(on, text) {
  $("live").className = `live ${on ? "on" : "off"}`;
  $("live").textContent = text;
}

function askForKey(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-problem").textContent = message ?? "";
  $("key").focus();
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  key = $("key").value.trim();
  sessionStorage.setItem(STORE, key);
  // the last refusal's reason goes: the next one is this key's
  $("login-problem").textContent = "";
  $("login").hidden = true;
  follow();
});

function drawTraffic(root, doc) {
  const t = doc.traffic;
  $("traffic-scope").textContent = `(${t.scope}; last ${t.chart_s} s, figures over ${t.summary_s} s)`;
  const models = Object.keys(t.series);
  if (!models.length) {
    root.replaceChildren(el("p", { class: "empty", text: `no requests in the last ${t.chart_s} s` }));
    return;
  }
  root.replaceChildren(
    ...models.map((m) => {
      const points = t.series[m];
      const sum = t.summary[m];
      const total = points.reduce((a, p) => a + p.requests, 0);
      const figures = sum
        ? `${format(sum.requests_per_s)} req/s · p50 ${format(sum.p50_ms)} ms · p99 ${format(sum.p99_ms)} ms · ${format(sum.tokens_per_s)} tokens/s · ${sum.errors} errors · ${sum.throttled} × 429`
        : "idle";
      return el(
        "div",
        { class: "model-traffic", "data-chart": m, "data-requests": total },
        el("h3", { text: m }),
        el("div", { class: "figures", text: `${total} requests in ${t.chart_s} s · ${figures}` }),
        lineChart("requests/s", "", [
          { name: "requests", color: "#2563eb", values: points.map((p) => p.requests) },
          { name: "errors", color: "#dc2626", values: points.map((p) => p.errors) },
          { name: "429", color: "#d97706", values: points.map((p) => p.throttled) },
        ]),
        lineChart("latency", "ms", [
          { name: "p50", color: "#1f9d55", values: points.map((p) => p.p50_ms) },
          { name: "p99", color: "#9333ea", values: points.map((p) => p.p99_ms) },
        ]),
        lineChart("tokens/s", "", [{ name: "tokens", color: "#0891b2", values: points.map((p) => p.tokens) }]),
      );
    }),
  );
}

function draw(doc) {
  const c = doc.coordinator;
  $("coordinator").textContent = `coordinator ${c.id}${c.is_leader ? " (leader)" : c.leader == null ? " (no leader known)" : ` (leader: ${c.leader})`} · term ${c.term} · applied ${c.applied ?? "–"}`;
  const gpus = doc.nodes.reduce((a, n) => a + n.gpus.length, 0);
  const ready = doc.nodes.filter((n) => n.state === "ready").length;
  $("fleet-summary").textContent = `(${doc.nodes.length} nodes, ${ready} ready, ${gpus} GPUs)`;
  drawFleet($("fleet"), doc);
  drawModels($("models"), doc);
  drawTraffic($("traffic"), doc);
  drawForecasts($("forecasts"), $("forecast-scope"), doc);
  drawAudit($("audit"), doc);
  updates += 1;
  document.body.dataset.updates = String(updates);
  $("main").hidden = false;
  $("problem").hidden = true;
}

function problem(text) {
  $("problem").textContent = text;
  $("problem").hidden = false;
}

/// Reads server-sent events from a fetch body: calls `on(event, data)` per
/// event until the stream ends.
async function readEvents(body, on) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) on(event, data.join("\n"));
    }
  }
}

async function follow() {
  for (;;) {
    try {
      const response = await fetch("/dashboard/api/events", { headers: headers(), cache: "no-store" });
      if (response.status === 401 || response.status === 403) {
        const body = await response.json().catch(() => ({}));
        live(false, "no access");
        askForKey(body?.error?.message ?? `refused (${response.status})`);
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      live(true, "live");
      let refused = null;
      await readEvents(response.body, (event, data) => {
        if (event === "snapshot") draw(JSON.parse(data));
        else if (event === "problem") problem(data);
        else if (event === "refused") refused = data;
      });
      if (refused) {
        live(false, "no access");
        askForKey(refused);
        return;
      }
    } catch (e) {
      problem(`lost the coordinator (${e.message}); retrying`);
    }
    live(false, "reconnecting");
    await new Promise((r) => setTimeout(r, RETRY_MS));
  }
}

follow();
