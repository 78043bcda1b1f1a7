// The dashboard: fetches /api/*, redraws on every `change` the server streams (a commit to the fleet store).
"use strict";

const state = {selected: null, refreshing: false, again: false};

const $ = id => document.getElementById(id);

function td(text, cls, attrs) {
  const cell = document.createElement("td");
  if (text instanceof Node) cell.appendChild(text); else cell.textContent = text ?? "–";
  if (cls) cell.className = cls;
  for (const [k, v] of Object.entries(attrs || {})) cell.setAttribute(k, v);
  return cell;
}

function badge(text, cls) {
  const b = document.createElement("span");
  b.className = `badge ${cls || text}`;
  b.textContent = text;
  return b;
}

function num(v, digits) {
  return v === null || v === undefined ? "–" : Number(v).toFixed(digits);
}

function ago(ts, now) {
  if (!ts) return "never";
  const s = Math.max(0, now - ts);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  return new Date(ts * 1000).toLocaleString();
}

function when(ts) {
  return new Date(ts * 1000).toLocaleString();
}

async function api(path) {
  const r = await fetch(path, {credentials: "same-origin", cache: "no-store"});
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

function renderFleet(overview) {
  const c = overview.counts;
  $("count-devices").textContent = c.devices;
  $("count-online").textContent = c.online;
  $("count-over").textContent = c.over_budget;
  $("count-updating").textContent = c.updating;
  const body = $("fleet").tBodies[0];
  const rows = overview.devices.map(d => {
    const m = d.metrics || {};
    const tr = document.createElement("tr");
    tr.dataset.device = d.device_id;
    tr.dataset.testid = `device-${d.device_id}`;
    if (d.device_id === state.selected) tr.className = "selected";
    tr.appendChild(td(d.device_id));
    tr.appendChild(td(d.target));
    tr.appendChild(td(badge(d.online ? "online" : "offline"), null, {"data-testid": `online-${d.device_id}`}));
    const model = d.active_version === null || d.active_version === undefined ? "none"
      : `v${d.active_version}` + (d.slot ? ` (slot ${d.slot})` : "");
    tr.appendChild(td(model, null, {"data-testid": `version-${d.device_id}`,
                                    "data-value": String(d.active_version ?? "")}));
    const st = document.createElement("span");
    st.textContent = d.state || "–";
    if (d.updating && d.progress !== null && d.progress !== undefined) {
      const p = document.createElement("progress");
      p.max = 1; p.value = d.progress;
      p.title = `v${d.job_version}: ${(100 * d.progress).toFixed(0)}%`;
      st.append(" ", p);
    }
    tr.appendChild(td(st, null, {"data-testid": `state-${d.device_id}`}));
    tr.appendChild(td(ago(d.last_seen, overview.generated_at)));
    tr.appendChild(td(num(m.latency_ms_p95, 2), "num",
                      {"data-testid": `p95-${d.device_id}`, "data-value": String(m.latency_ms_p95 ?? "")}));
    tr.appendChild(td(num(m.rss_mb, 1), "num",
                      {"data-testid": `rss-${d.device_id}`, "data-value": String(m.rss_mb ?? "")}));
    const energy = document.createElement("span");
    energy.textContent = num(m.energy_mj, 3);
    if (m.energy_source) {
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = m.energy_source.startsWith("measured") ? " measured" : " predicted";
      energy.appendChild(tag);
    }
    tr.appendChild(td(energy, "num", {"data-testid": `energy-${d.device_id}`, "data-value": String(m.energy_mj ?? "")}));
    const b = d.budget;
    const label = b.status === "over" ? `over: ${b.over.join(", ")}` : b.status;
    tr.appendChild(td(badge(label, b.status), null, {"data-testid": `budget-${d.device_id}`}));
    tr.addEventListener("click", () => select(d.device_id));
    return tr;
  });
  body.replaceChildren(...rows);
  $("fleet-empty").hidden = rows.length > 0;
  if (!state.selected && overview.devices.length) select(overview.devices[0].device_id, false);
}

async function renderDevice() {
  if (!state.selected) return;
  const d = await api(`/api/devices/${encodeURIComponent(state.selected)}`);
  $("device").hidden = false;
  $("device-name").textContent = d.device_id;
  $("device-target").textContent = d.target ? `class ${d.target}` : "";
  const s = d.series;
  const pts = key => s.filter(p => p[key] !== null && p[key] !== undefined).map(p => [p.ts, p[key]]);
  const b = d.budgets || {};
  lineChart($("chart-latency"), [
    {name: "p50", color: "#2257a8", points: pts("latency_ms_p50")},
    {name: "p95", color: "#b26a00", points: pts("latency_ms_p95")},
    {name: "p99", color: "#7b1fa2", points: pts("latency_ms_p99")},
  ], b.latency_ms ?? null);
  lineChart($("chart-memory"), [{name: "RSS", color: "#2257a8", points: pts("rss_mb")}], b.peak_memory_mb ?? null);
  lineChart($("chart-energy"), [{name: "mJ", color: "#1a7f37", points: pts("energy_mj")}], b.energy_mj ?? null);
}

function renderDeployments(rows) {
  $("deployments").tBodies[0].replaceChildren(...rows.map(r => {
    const tr = document.createElement("tr");
    tr.dataset.testid = `deployment-${r.id}`;
    tr.appendChild(td(when(r.ts)));
    tr.appendChild(td(r.target));
    tr.appendChild(td(r.kind));
    tr.appendChild(td(`v${r.version}`, "num"));
    tr.appendChild(td(badge(r.status)));
    const p = r.progress;
    const cell = document.createElement("span");
    const bar = document.createElement("progress");
    bar.max = Math.max(1, p.total); bar.value = p.succeeded;
    cell.append(bar, ` ${p.succeeded}/${p.total} `);
    if (r.status === "in_progress") cell.append(`(${p.total - p.done} updating) `);
    const phases = [...new Set(r.devices.map(x => x.phase).filter(Boolean))];
    if (phases.length) cell.append(`(${phases.join(" → ")})`);
    tr.appendChild(td(cell, null, {"data-testid": `deployment-progress-${r.id}`}));
    const why = document.createElement("span");
    const sh = r.rollout && r.rollout.shadow;
    if (sh) {  // the shadow stage's decision (pipeline.ota.shadow): promoted or aborted, and on what evidence
      const agree = (sh.devices || []).map(x => x.agreement).filter(a => a !== null && a !== undefined);
      const samples = (sh.devices || []).reduce((n, x) => n + (x.samples || 0), 0);
      why.append(badge(`shadow ${sh.decision}`, sh.decision === "promoted" ? "activated" : "aborted"),
                 ` v${sh.candidate}: ${samples} requests compared on ${(sh.devices || []).length} device(s)` +
                 (agree.length ? `, agreement ≥ ${pct(Math.min(...agree))}` : "") + (r.reason ? ". " : "."));
    }
    why.append(r.reason || "");
    tr.appendChild(td(why, "msg", {"data-testid": `deployment-reason-${r.id}`}));
    return tr;
  }));
}

const METRICS = {latency_p50: "latency p50", latency_p95: "latency p95", memory_rss: "RSS vs peak memory"};

function pct(v, signed) {
  if (v === null || v === undefined) return "–";
  return `${signed && v > 0 ? "+" : ""}${(100 * v).toFixed(signed ? 1 : 0)}%`;
}

function renderPredictions(check) {
  const widest = Math.max(...check.tolerances);
  const rows = check.classes.filter(c => c.comparisons > 0 || c.skipped.invalid > 0).map(c => {
    const id = `${c.target}-${c.basis}-${c.metric}`;
    const tr = document.createElement("tr");
    tr.dataset.testid = `prediction-${id}`;
    tr.appendChild(td(c.target));
    tr.appendChild(td(c.basis === "host" ? "host prediction (emulated agents)" : `${c.target} prediction`, null,
                      {"data-testid": `prediction-basis-${id}`, "data-value": c.basis}));
    tr.appendChild(td(METRICS[c.metric] || c.metric));
    tr.appendChild(td(String(c.versions), "num"));
    tr.appendChild(td(String(c.devices), "num", {"data-testid": `prediction-devices-${id}`}));
    tr.appendChild(td(String(c.samples), "num", {"data-testid": `prediction-samples-${id}`}));
    const bad = c.median_error !== null && Math.abs(c.median_error) > widest;
    tr.appendChild(td(c.median_error === null ? "–" : badge(pct(c.median_error, true), bad ? "over" : "ok"), "num",
                      {"data-testid": `prediction-error-${id}`, "data-value": String(c.median_error ?? "")}));
    tr.appendChild(td(pct(c.within_10pct), "num",
                      {"data-testid": `prediction-within10-${id}`, "data-value": String(c.within_10pct ?? "")}));
    tr.appendChild(td(pct(c.within_20pct), "num",
                      {"data-testid": `prediction-within20-${id}`, "data-value": String(c.within_20pct ?? "")}));
    const skipped = Object.values(c.skipped).reduce((a, b) => a + b, 0);
    const why = `${c.skipped.unpredicted} with no prediction recorded, ` +
                `${c.skipped.invalid} missing, zero, negative or not finite`;
    tr.appendChild(td(String(skipped), "num", {"data-testid": `prediction-skipped-${id}`, "title": why}));
    return tr;
  });
  $("predictions").tBodies[0].replaceChildren(...rows);
  $("predictions-empty").hidden = rows.length > 0;
}

function renderTraffic(traffic) {
  const rows = traffic.devices.map(d => {
    const id = d.device_id;
    const tr = document.createElement("tr");
    tr.dataset.testid = `traffic-${id}`;
    tr.appendChild(td(id));
    tr.appendChild(td(d.target));
    const cell = (key, text, value) => td(text, "num", {"data-testid": `traffic-${key}-${id}`,
                                                        "data-value": String(value ?? "")});
    tr.appendChild(cell("requests", String(d.requests), d.requests));
    tr.appendChild(cell("answered", String(d.answered), d.answered));
    for (const q of ["p50", "p95", "p99"]) tr.appendChild(cell(q, num(d[`${q}_ms`], 2), d[`${q}_ms`]));
    const errors = cell("errors", d.errors_total ? badge(String(d.errors_total), "over") : "0", d.errors_total);
    errors.title = Object.entries(d.errors).map(([k, n]) => `${k}: ${n}`).join(", ") || "no failed request";
    tr.appendChild(errors);
    tr.appendChild(cell("rejected", String(d.rejected), d.rejected));
    tr.appendChild(cell("queue-peak", d.queue_peak ?? "–", d.queue_peak));
    return tr;
  });
  $("traffic").tBodies[0].replaceChildren(...rows);
  $("traffic-empty").hidden = rows.length > 0;
}

const DRIFT_BADGE = {ok: "ok", drifting: "over", collecting: "unknown"};

function renderQuality(quality) {
  const rows = quality.devices.flatMap(d => d.versions.map(v => {
    const id = `${d.device_id}-${v.version}`;
    const s = v.drift || {};
    const a = v.accuracy || {};
    const tr = document.createElement("tr");
    tr.dataset.testid = `quality-${id}`;
    tr.appendChild(td(d.device_id));
    tr.appendChild(td(d.target));
    tr.appendChild(td(`v${v.version}`, "num"));
    const cell = (key, text, value) => td(text, "num", {"data-testid": `quality-${key}-${id}`,
                                                        "data-value": String(value ?? "")});
    const state = td(s.state ? badge(s.state, DRIFT_BADGE[s.state] || "unknown") : "–", null,
                     {"data-testid": `quality-state-${id}`, "data-value": s.state || ""});
    state.title = s.state === "drifting"
      ? s.drifting.map(e => `${e.score} ${Number(e.value).toPrecision(3)} > ${e.threshold}`).join(", ")
      : s.state === "collecting" ? `fewer than ${s.thresholds.min_samples} samples in the window` : "";
    tr.appendChild(state);
    tr.appendChild(cell("psi-outputs", num(s.psi_outputs, 3), s.psi_outputs));
    tr.appendChild(cell("psi-confidence", num(s.psi_confidence, 3), s.psi_confidence));
    tr.appendChild(cell("mean-shift", num(s.max_mean_shift, 3), s.max_mean_shift));
    tr.appendChild(cell("samples", s.samples ?? "–", s.samples));
    tr.appendChild(cell("accuracy", pct(a.accuracy), a.accuracy));
    tr.appendChild(cell("labelled", a.labelled ?? "–", a.labelled));
    return tr;
  }));
  $("quality").tBodies[0].replaceChildren(...rows);
  $("quality-empty").hidden = rows.length > 0;
  const shadows = quality.devices.flatMap(d => d.shadow.map(s => {
    const id = `${d.device_id}-${s.candidate}`;
    const tr = document.createElement("tr");
    tr.dataset.testid = `shadow-${id}`;
    const cell = (key, text, value) => td(text, "num", {"data-testid": `shadow-${key}-${id}`,
                                                        "data-value": String(value ?? "")});
    tr.appendChild(td(d.device_id));
    tr.appendChild(td(`v${s.candidate}`, "num"));
    tr.appendChild(td(s.active === null ? "–" : `v${s.active}`, "num"));
    tr.appendChild(cell("compared", String(s.compared), s.compared));
    tr.appendChild(cell("agreement", s.top1 ? pct(s.agreement) : `max distance ${num(s.max_distance, 3)}`,
                        s.agreement));
    tr.appendChild(cell("active-p50", num(s.active_p50_ms, 2), s.active_p50_ms));
    tr.appendChild(cell("candidate-p50", num(s.candidate_p50_ms, 2), s.candidate_p50_ms));
    tr.appendChild(cell("dropped", String(s.dropped), s.dropped));
    tr.appendChild(cell("errors", String(s.errors), s.errors));
    return tr;
  }));
  $("shadow").tBodies[0].replaceChildren(...shadows);
  $("shadow").hidden = shadows.length === 0;
}

function renderEvents(rows) {
  $("events").tBodies[0].replaceChildren(...rows.map(e => {
    const tr = document.createElement("tr");
    tr.appendChild(td(when(e.ts)));
    tr.appendChild(td(e.device_id));
    tr.appendChild(td(badge(e.kind, ["rolled_back", "refused", "chunk_corrupt", "inference_error", "drift_detected"]
                                     .includes(e.kind) ? "failed" : e.kind === "drift_cleared" ? "ok" : "unknown")));
    tr.appendChild(td(e.message, "msg"));
    return tr;
  }));
}

function select(device, redraw = true) {
  state.selected = device;
  for (const tr of $("fleet").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.device === device);
  if (redraw) renderDevice().catch(showError);
}

function showError(err) {
  $("live-text").textContent = String(err.message || err);
}

// One refresh at a time; a change that arrives during one schedules exactly one more.
async function refresh() {
  if (state.refreshing) { state.again = true; return; }
  state.refreshing = true;
  try {
    // each panel stands on its own: one endpoint failing leaves the others refreshing, and says why
    const settled = await Promise.allSettled(
      [api("/api/overview"), api("/api/deployments?limit=20"), api("/api/events?limit=50"), api("/api/predictions"),
       api("/api/traffic"), api("/api/quality")]);
    const [overview, deployments, events, predictions, traffic, quality] =
      settled.map((s) => s.status === "fulfilled" ? s.value : null);
    if (overview) renderFleet(overview);
    await renderDevice();
    if (traffic) renderTraffic(traffic);
    if (quality) renderQuality(quality);
    if (predictions) renderPredictions(predictions);
    if (deployments) renderDeployments(deployments);
    if (events) renderEvents(events);
    const failed = settled.find((s) => s.status === "rejected");
    if (failed) throw failed.reason;
    $("updated").textContent = new Date().toLocaleTimeString();
    document.body.dataset.refreshed = String(Date.now());
  } catch (err) {
    showError(err);
  } finally {
    state.refreshing = false;
    if (state.again) { state.again = false; refresh(); }
  }
}

function connect() {
  const stream = new EventSource("/api/stream");
  stream.addEventListener("open", () => { $("live-dot").classList.add("on"); $("live-text").textContent = "live"; });
  stream.addEventListener("change", refresh);
  stream.addEventListener("error", () => {  // EventSource reconnects by itself
    $("live-dot").classList.remove("on");
    $("live-text").textContent = "reconnecting";
  });
}

refresh();
connect();
