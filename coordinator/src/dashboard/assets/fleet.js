// The fleet, the models and the audit log, drawn from the snapshot
// document (see coordinator/src/dashboard/snapshot.rs). Text from the
// document only ever goes into textContent.

export function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v == null) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("data-")) e.setAttribute(k, String(v));
    else e[k] = v;
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

const GIB = 1024 ** 3;

function gib(bytes) {
  return `${(bytes / GIB).toFixed(bytes >= 10 * GIB ? 0 : 1)} GiB`;
}

function bar(kind, fraction, label) {
  const f = Math.max(0, Math.min(1, fraction ?? 0));
  const inner = el("span");
  inner.style.width = `${(f * 100).toFixed(1)}%`;
  return el("div", { class: `bar ${kind}`, title: label }, inner, el("label", { text: label }));
}

/// A node's state as one word: ready, suspect, down; draining or
/// cordoned when it takes no new work.
export function nodeState(n) {
  if (n.state !== "ready") return n.state;
  if (n.draining) return "draining";
  if (!n.schedulable) return "cordoned";
  return "ready";
}

/// Compute slices of a MIG profile ("3g.40gb" → 3), of the 7 (or 8 on
/// some parts) a GPU has.
function migSlices(profile) {
  const m = /^(\d+)g\./.exec(profile);
  return m ? Number(m[1]) : 1;
}

function replicasOn(models, nodeId, gpuIndex) {
  const out = [];
  for (const m of models) {
    for (const r of m.replicas) {
      if (r.node === nodeId && (r.gpus.includes(gpuIndex))) out.push(r);
    }
  }
  return out;
}

/// The MIG device a replica runs on, from its node's inventory.
function migDevice(nodes, r) {
  if (!r.mig_device) return null;
  const node = nodes.find((n) => n.id === r.node);
  for (const g of node?.gpus ?? []) {
    const d = g.mig.find((m) => m.uuid === r.mig_device);
    if (d) return d;
  }
  return null;
}

function placement(r, nodes) {
  const parts = [];
  const device = migDevice(nodes, r);
  if (r.mig_slice) parts.push(`GPU ${r.gpus[0]} MIG ${r.mig_slice}`);
  else if (r.mig_device) parts.push(`GPU ${r.gpus[0]} MIG ${device ? `${device.profile}@${device.start ?? 0}` : r.mig_device}`);
  else if (r.gpus.length > 1) parts.push(`TP×${r.gpus.length} GPUs ${r.gpus.join(",")}`);
  else parts.push(`GPU ${r.gpus.join(",")}${r.milli < 1000 ? ` (${r.milli / 10}% share)` : ""}`);
  if (r.pipeline) {
    const p = r.pipeline;
    parts.push(`stage ${p.index + 1}/${p.count} layers ${p.first_layer}–${p.first_layer + p.layers - 1}`);
  }
  return parts.join(" · ");
}

function migStrip(g, nodeId, models) {
  const total = Math.max(7, ...g.mig.map((d) => (d.start ?? 0) + migSlices(d.profile)));
  const strip = el("div", { class: "mig", "data-mig": `${nodeId}/${g.index}` });
  const onGpu = replicasOn(models, nodeId, g.index);
  for (const d of g.mig) {
    const start = d.start ?? 0;
    const used = onGpu.find((r) => r.mig_device === d.uuid || r.mig_slice === `${d.profile}@${start}`);
    const s = el("div", {
      class: used ? "slice used" : "slice",
      text: used ? `${d.profile} ${used.model}` : d.profile,
      title: `${d.profile} at slice ${start}, ${gib(d.memory_bytes)}${used ? `, replica ${used.id}` : ", free"}`,
      "data-slice": `${d.profile}@${start}`,
    });
    s.style.left = `${(start / total) * 100}%`;
    s.style.width = `${(migSlices(d.profile) / total) * 100}%`;
    strip.append(s);
  }
  return strip;
}

function gpuRow(g, nodeId, models, nodes) {
  const used = g.memory_used_bytes;
  const memLabel = used == null ? `${gib(g.memory_bytes)} (no telemetry)` : `${gib(used)} / ${gib(g.memory_bytes)}`;
  const row = el(
    "div",
    { class: "gpu", "data-gpu": `${nodeId}/${g.index}`, "data-gpu-type": g.type },
    el("div", { class: "name", text: `GPU ${g.index} · ${g.type} · ${g.name}${g.mig_enabled ? " · MIG" : ""}` }),
    bar("mem", used == null ? 0 : used / g.memory_bytes, `memory ${memLabel}`),
    bar("util", (g.utilization ?? 0) / 100, `utilization ${g.utilization == null ? "–" : g.utilization + "%"}`),
  );
  if (g.mig_enabled && g.mig.length) row.append(migStrip(g, nodeId, models));
  const chips = el("div", { class: "chips" });
  for (const r of replicasOn(models, nodeId, g.index)) {
    chips.append(el("span", { class: "chip", text: `${r.model} ${r.id}`, title: placement(r, nodes), "data-replica": r.id }));
  }
  row.append(chips);
  return row;
}

export function drawFleet(root, doc) {
  const cards = doc.nodes.map((n) => {
    const state = nodeState(n);
    return el(
      "div",
      { class: "node", "data-node": n.id, "data-node-state": state },
      el("h3", {}, el("span", { text: n.id }), el("span", { class: `badge ${state}`, text: state, "data-state-badge": n.id })),
      el("div", {
        class: "meta",
        text: `${n.addr} · ${n.gpus.length} GPU(s) · ${n.probe} · $${n.cost_per_hour.toFixed(2)}/h${
          n.telemetry_age_ms == null ? " · no telemetry" : ` · telemetry ${n.telemetry_age_ms} ms ago`
        }${n.state_reason ? " · " + n.state_reason : ""}`,
      }),
      ...n.gpus.map((g) => gpuRow(g, n.id, doc.models, doc.nodes)),
    );
  });
  root.replaceChildren(...(cards.length ? cards : [el("p", { class: "empty", text: "no nodes registered" })]));
}

export function drawModels(root, doc) {
  if (!doc.models.length) {
    root.replaceChildren(el("p", { class: "empty", text: "no models registered" }));
    return;
  }
  const head = el("tr", {}, ...["model", "version", "engine", "replicas", "priority", "placements"].map((h) => el("th", { text: h })));
  const rows = doc.models.map((m) => {
    const ready = m.replicas.filter((r) => r.state === "ready").length;
    const list = el("div");
    for (const r of m.replicas) {
      list.append(el("div", { "data-placement": r.id, text: `${r.id} → ${r.node}: ${placement(r, doc.nodes)} [${r.state || "unknown"}]` }));
    }
    if (doc.unplaced.includes(m.name)) list.append(el("div", { class: "problem", text: "not all replicas could be placed" }));
    return el(
      "tr",
      { "data-model": m.name },
      el("td", { text: m.name }),
      el("td", { text: m.version ?? "" }),
      el("td", { text: m.engine ?? "" }),
      el("td", { text: `${ready} ready / ${m.replicas.length} placed (min ${m.min_replicas}, max ${m.max_replicas})` }),
      el("td", { text: m.priority }),
      el("td", {}, list),
    );
  });
  root.replaceChildren(el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)));
}

export function drawAudit(root, doc) {
  if (!doc.audit.length) {
    root.replaceChildren(el("p", { class: "empty", text: "no audit entries" }));
    return;
  }
  const head = el("tr", {}, ...["#", "time", "actor", "action", "target", "detail"].map((h) => el("th", { text: h })));
  const rows = doc.audit.map((a) =>
    el(
      "tr",
      { "data-audit": a.index },
      el("td", { text: String(a.index) }),
      el("td", { text: new Date(a.at_ms).toLocaleTimeString() }),
      el("td", { text: a.actor }),
      el("td", { text: a.action }),
      el("td", { text: a.target }),
      el("td", { text: a.detail }),
    ),
  );
  root.replaceChildren(el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)));
}
