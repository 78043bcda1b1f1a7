// A small SVG line chart with a dashed budget line: no library, nothing fetched from elsewhere.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function fmtTick(v) {
  if (v === 0) return "0";
  if (Math.abs(v) >= 100) return v.toFixed(0);
  if (Math.abs(v) >= 1) return v.toFixed(1);
  return v.toPrecision(2);
}

// series: [{name, color, points: [[ts, value], ...]}]; budget: a number or null
function lineChart(container, series, budget) {
  const W = 420, H = 180, L = 44, R = 10, T = 10, B = 28;
  const all = series.flatMap(s => s.points);
  container.replaceChildren();
  const svg = svgEl("svg", {viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img"});
  container.appendChild(svg);
  container.dataset.points = String(all.length);
  if (!all.length) {
    svg.appendChild(svgEl("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no data yet"));
    return;
  }
  const t0 = Math.min(...all.map(p => p[0])), t1 = Math.max(...all.map(p => p[0]));
  const top = Math.max(...all.map(p => p[1]), budget ?? 0) * 1.12 || 1;
  const x = t => L + (t1 > t0 ? (t - t0) / (t1 - t0) : 0.5) * (W - L - R);
  const y = v => T + (1 - v / top) * (H - T - B);

  svg.appendChild(svgEl("line", {class: "axis", x1: L, y1: y(0), x2: W - R, y2: y(0)}));
  svg.appendChild(svgEl("line", {class: "axis", x1: L, y1: T, x2: L, y2: y(0)}));
  for (const v of [0, top / 2, top]) {
    svg.appendChild(svgEl("text", {x: L - 4, y: y(v) + 3, "text-anchor": "end"}, fmtTick(v)));
  }
  const clock = t => new Date(t * 1000).toLocaleTimeString();
  svg.appendChild(svgEl("text", {x: L, y: H - 8}, clock(t0)));
  svg.appendChild(svgEl("text", {x: W - R, y: H - 8, "text-anchor": "end"}, clock(t1)));

  if (budget !== null && budget !== undefined) {
    svg.appendChild(svgEl("line", {class: "budget", "data-testid": "budget-line", "data-value": String(budget),
                                   x1: L, y1: y(budget), x2: W - R, y2: y(budget)}));
    svg.appendChild(svgEl("text", {class: "budget-label", x: W - R, y: y(budget) - 3, "text-anchor": "end"},
                          `budget ${fmtTick(budget)}`));
  }
  let lx = L + 6;
  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
    svg.appendChild(svgEl("path", {d, fill: "none", stroke: s.color, "stroke-width": 1.6,
                                   "data-series": s.name, "data-last": String(s.points[s.points.length - 1][1])}));
    if (s.points.length === 1) {
      const [pt, pv] = s.points[0];
      svg.appendChild(svgEl("circle", {cx: x(pt), cy: y(pv), r: 2.5, fill: s.color}));
    }
    svg.appendChild(svgEl("text", {x: lx, y: T + 10, fill: s.color}, s.name));
    lx += 8 + 7 * s.name.length;
  }
}

window.lineChart = lineChart;
