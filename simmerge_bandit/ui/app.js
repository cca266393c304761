// The dashboard: polls GET /v1/dashboard (the session cookie travels with it) and redraws. Every value goes into
// the page as text (textContent), never as markup: model, task and operator names are data, not HTML.
"use strict";

const params = new URLSearchParams(location.search);
// ?poll=MS sets the refresh period (tests use a short one); 2 s by default, 200 ms at least.
const POLL_MS = Math.max(200, Number(params.get("poll")) || 2000);
const SVG = "http://www.w3.org/2000/svg";
let timer = null;
let updates = 0;

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function num(v, digits = 3) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  return Number.isInteger(v) ? v.toLocaleString("en") : v.toFixed(digits);
}

function when(ts) {
  if (!ts) return "–";
  const s = String(ts).replace(" ", "T");
  return s.length > 19 ? s.slice(0, 19) : s;
}

function merge(models, operator) {
  const ops = (operator || []).join(" → ");
  return `${(models || []).join(" + ")}  [${ops}]`;
}

function scores(obj) {
  if (!obj) return "–";
  return Object.entries(obj).map(([t, v]) => `${t}: ${num(v)}`).join(", ");
}

function fill(tableId, rows, cells, empty) {
  const body = $(tableId).tBodies[0];
  const frag = document.createDocumentFragment();
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const c of cells(r)) {
      tr.appendChild(c instanceof Node ? c : el("td", c));
    }
    frag.appendChild(tr);
  }
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = el("td", empty, "muted");
    td.colSpan = $(tableId).tHead.rows[0].cells.length;
    tr.appendChild(td);
    frag.appendChild(tr);
  }
  body.replaceChildren(frag);
}

function badge(state) {
  const td = el("td");
  td.appendChild(el("span", state, `badge ${state}`));
  return td;
}

function chart(svgId, points, key, color) {
  const svg = $(svgId);
  const W = 480, H = 180, L = 48, R = 8, T = 8, B = 22;
  const kids = [];
  const line = (x1, y1, x2, y2, cls) => {
    const l = document.createElementNS(SVG, "line");
    l.setAttribute("x1", x1); l.setAttribute("y1", y1); l.setAttribute("x2", x2); l.setAttribute("y2", y2);
    l.setAttribute("class", cls);
    return l;
  };
  const text = (x, y, s, anchor) => {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("text-anchor", anchor || "end");
    t.setAttribute("class", "tick");
    t.textContent = s;
    return t;
  };
  kids.push(line(L, H - B, W - R, H - B, "axis"), line(L, T, L, H - B, "axis"));
  if (!points.length) {
    kids.push(text(W / 2, H / 2, "no rewards yet", "middle"));
    svg.replaceChildren(...kids);
    return;
  }
  const xs = points.map((p) => p.rewards), ys = points.map((p) => p[key]);
  const x0 = 0, x1 = Math.max(...xs);
  let y0 = Math.min(0, ...ys), y1 = Math.max(...ys);
  if (y1 === y0) y1 = y0 + 1;
  const sx = (x) => L + (W - L - R) * (x - x0) / ((x1 - x0) || 1);
  const sy = (y) => H - B - (H - B - T) * (y - y0) / (y1 - y0);
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    kids.push(line(L, sy(y), W - R, sy(y), "grid"), text(L - 4, sy(y) + 4, num(y, 2)));
  }
  kids.push(text(L, H - 6, "0", "start"), text(W - R, H - 6, `${num(x1)} rewards`));
  const path = document.createElementNS(SVG, "polyline");
  const pts = (points.length === 1 ? [{ rewards: 0, [key]: key === "cumulative" ? 0 : ys[0] }, ...points] : points);
  path.setAttribute("points", pts.map((p) => `${sx(p.rewards).toFixed(1)},${sy(p[key]).toFixed(1)}`).join(" "));
  path.setAttribute("class", "curve");
  path.setAttribute("stroke", color);
  kids.push(path);
  svg.replaceChildren(...kids);
}

function render(d) {
  const st = d.status;
  for (const k of ["models", "tasks", "operators", "decisions", "rewards"]) {
    $(`count-${k}`).textContent = num(st.counts[k]);
  }
  $("queue").textContent = Object.entries(st.queue).map(([k, v]) => `${k} ${v}`).join(" · ");
  $("budget").textContent = `${st.budget.used} / ${st.budget.limit} per ${num(st.budget.window_s / 3600, 1)} h`;
  const snaps = d.policy.snapshots.map((p) => `${p.name} (learned through reward ${p.last_seq})`).join(", ");
  $("policy").textContent = `${d.policy.default}` + (snaps ? ` — snapshots: ${snaps}` : "");
  const up = st.uptime_s !== undefined ? ` · up ${num(st.uptime_s / 3600, 1)} h` : "";
  $("daemon").textContent = st.pid !== undefined ? `daemon pid ${st.pid}, port ${st.port}${up}` : "";

  chart("curve-cumulative", d.curve, "cumulative", "#2563eb");
  chart("curve-mean", d.curve, "mean", "#059669");

  fill("targets", d.targets, (t) => [
    el("td", t.target, "name"), num(t.decisions), num(t.rewards),
    t.best ? num(t.best.reward) : "–", t.best ? merge(t.best.models, t.best.operator) : "no reward yet",
    t.best ? scores(t.best.scores) : "–", t.best ? when(t.best.at) : "–",
  ], "no decisions yet");
  $("decisions-note").textContent = `(latest ${d.shown.decisions})`;
  fill("decisions", d.decisions, (r) => [
    when(r.created_at), el("td", r.id, "mono"), el("td", r.target, "name"), merge(r.models, r.operator), r.policy,
    num(r.rank), num(r.propensity), r.evaluate ? "yes" : "no",
    el("td", r.reward === null ? "pending" : num(r.reward), r.reward === null ? "muted" : "reward"),
  ], "no decisions yet");
  fill("jobs", d.jobs.evaluations, (j) => [
    when(j.updated_at), el("td", j.id, "mono"), badge(j.state), num(j.attempts), el("td", j.target, "name"),
    merge(j.models, j.operator), num(j.reward), el("td", j.error || "", "error"),
  ], "no evaluation jobs");
  fill("searches", d.jobs.searches, (s) => [
    el("td", s.id, "mono"), el("td", s.target, "name"), s.policy, badge(s.state), `${s.spent} / ${s.budget}`,
    num(s.best_reward), el("td", s.error || "", "error"),
  ], "no searches");
  fill("operators", d.operators, (o) => [
    el("td", o.name, "name"), o.method,
    el("td", Object.entries(o.params || {}).map(([k, v]) => `${k}=${v}`).join(", ") +
      (o.ranges ? ` (ranges ${Object.entries(o.ranges).map(([k, v]) => `${k}∈[${v}]`).join(", ")})` : ""), "small"),
    badge(o.status), num(o.chosen), num(o.mean_reward),
  ], "no operators");
  fill("models", d.models, (m) => [
    el("td", m.name, "name"), m.base || "–", (m.tasks || []).join(", ") || "–", m.architecture || "–",
    num(m.n_params),
  ], "no models");
  updates += 1;
  document.body.dataset.updates = String(updates);
}

function setState(text, cls) {
  const s = $("state");
  s.textContent = text;
  s.className = `state ${cls}`;
}

async function poll() {
  try {
    const resp = await fetch("/v1/dashboard", { credentials: "same-origin", cache: "no-store" });
    if (resp.status === 401) {
      setState("session ended: run `simmerge ui` for a new login link", "bad");
      return; // no more polling: a new login is needed
    }
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
    setState(`live · updated ${new Date().toLocaleTimeString()}`, "ok");
  } catch (e) {
    setState(`daemon not answering (${e.message}); retrying`, "bad");
  }
  timer = setTimeout(poll, POLL_MS);
}

document.addEventListener("visibilitychange", () => {
  // a hidden tab does not poll; it catches up at once when shown again
  if (document.hidden) { clearTimeout(timer); timer = null; } else if (timer === null) { poll(); }
});

$("logout").addEventListener("click", async () => {
  clearTimeout(timer);
  await fetch("/ui/logout", { method: "POST", credentials: "same-origin" });
  location.reload();
});

poll();
