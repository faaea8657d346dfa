// The autoscaler's panel: per autoscaled model, the demand of the last
// buckets against the forecast and its upper band over the horizon, the
// replicas wanted, placed and ready, the plan and why, and how well the
// SLO was met. Drawn from the leader's figures (a follower's page says
// where to look).

import { lineChart, format } from "./chart.js";
import { el } from "./fleet.js";

export function drawForecasts(root, scopeEl, doc) {
  const a = doc.autoscale;
  scopeEl.textContent = `(${a.scope})`;
  const models = Object.keys(a.models);
  if (!models.length) {
    root.replaceChildren(el("p", { class: "empty", text: "no autoscaled model (max_replicas above min_replicas)" }));
    return;
  }
  root.replaceChildren(...models.map((m) => forecastCard(m, a.models[m])));
}

function forecastCard(name, s) {
  const past = s.history_rps ?? [];
  const ahead = s.forecast_rps ?? [];
  const gap = (n) => Array(n).fill(null);
  // the last past point starts the forecast's lines, so that they join
  const joint = past.length ? [past[past.length - 1]] : [];
  const start = past.length ? past.length - 1 : 0;
  const slo = s.slo_judged > 0
    ? `${format(s.slo_attainment * 100)} % of ${s.slo_judged} met the SLO`
    : "no request judged yet";
  const minutes = (ahead.length * s.bucket_s) / 60;
  return el(
    "div",
    { class: "model-traffic", "data-forecast": name, "data-desired": s.desired, "data-method": s.forecast_method },
    el("h3", { text: name }),
    el("div", {
      class: "figures",
      text: `desired ${s.desired} · placed ${s.placed} · ready ${s.ready} (${s.min_replicas}..${s.max_replicas}) · ${format(s.observed_rps)} req/s observed · planning for ${format(s.planned_rps)} req/s · ${slo} · trust ${format(s.trust)}`,
    }),
    lineChart(`requests/s: ${past.length} past buckets, ${format(minutes)} min ahead (${s.forecast_method || "no forecast yet"})`, "req/s", [
      { name: "observed", color: "#2563eb", values: [...past, ...gap(ahead.length)] },
      { name: "forecast", color: "#1f9d55", values: [...gap(start), ...joint, ...ahead] },
      { name: "upper band", color: "#d97706", values: [...gap(start), ...joint, ...(s.forecast_upper_rps ?? [])] },
    ]),
    el("div", { class: "figures", text: `why: ${s.reason}` }),
    el(
      "ul",
      { class: "plan" },
      ...s.plan.map((line) => el("li", { text: line })),
      el("li", { text: `${s.plan_replicas} replica(s), ${format(s.plan_capacity_rps)} req/s, $${format(s.plan_cost_per_hour)}/h; ${s.cold_starts} cold starts; loads in ${format(s.load_s)} s` }),
    ),
  );
}
