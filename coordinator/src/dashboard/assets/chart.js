// A small SVG line chart: one series per line, a shared y scale from 0,
// the largest value labelled. Built with DOM calls only (no markup from
// data).

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 400;
const HEIGHT = 70;
const PAD = 2;

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

/// `series`: [{name, color, values: [number|null]}] over the same seconds.
/// Returns an element holding the title, the chart and its legend.
export function lineChart(title, unit, series) {
  const box = document.createElement("div");
  box.className = "chart";
  const head = document.createElement("div");
  head.className = "title";
  box.append(head);
  const n = Math.max(1, ...series.map((s) => s.values.length));
  const max = Math.max(0, ...series.flatMap((s) => s.values.filter((v) => v != null)));
  const top = max > 0 ? max * 1.1 : 1;
  head.textContent = `${title} (max ${format(max)}${unit ? " " + unit : ""})`;
  const chart = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, preserveAspectRatio: "none", role: "img" });
  chart.setAttribute("aria-label", title);
  for (const s of series) {
    const points = [];
    s.values.forEach((v, i) => {
      if (v == null) return;
      const x = n === 1 ? WIDTH / 2 : (i / (n - 1)) * WIDTH;
      const y = HEIGHT - PAD - (v / top) * (HEIGHT - 2 * PAD);
      points.push(`${x.toFixed(1)},${y.toFixed(1)}`);
    });
    const line = svg("polyline", {
      points: points.join(" "),
      fill: "none",
      stroke: s.color,
      "stroke-width": 1.5,
      "vector-effect": "non-scaling-stroke",
    });
    line.dataset.series = s.name;
    line.dataset.sum = String(s.values.reduce((a, v) => a + (v ?? 0), 0));
    chart.append(line);
  }
  box.append(chart);
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const s of series) {
    const item = document.createElement("span");
    item.style.color = s.color;
    item.textContent = `— ${s.name}`;
    legend.append(item);
  }
  box.append(legend);
  return box;
}

export function format(v) {
  if (v == null || Number.isNaN(v)) return "–";
  if (v >= 100) return v.toFixed(0);
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(2);
}
