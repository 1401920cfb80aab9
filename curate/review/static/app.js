// curate review: the page. Plain DOM; every text from the manifests goes in as a text node.
"use strict";
window.__errors = [];  // what went wrong in this page (tests read it)
window.addEventListener("error", (e) => window.__errors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => window.__errors.push(String(e.reason)));
const TOKEN = new URLSearchParams(location.search).get("token") || "";
const CHUNK = 150;  // cards rendered at a time (more as the grid scrolls)
const $ = (id) => document.getElementById(id);
const S = {manifests: [], vocab: [], rows: [], filtered: [], cur: -1, sel: new Set(), dec: [], history: [],
           mine: [], shown: 0, byKey: []};
const BLANK = {dropped: null, keeper: null, split: false, box: null, caption: null, seen: false};

function el(tag, props, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "text") e.textContent = v;
    else if (k === "cls") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e[k] = v;
  }
  for (const kid of kids) if (kid != null) e.append(kid);
  return e;
}
// images carry the token in their query: no cookie may (another port of this host would get it)
const q = (m, key) => `m=${m}&key=${encodeURIComponent(key)}&token=${encodeURIComponent(TOKEN)}`;
function toast(text) { const t = $("toast"); t.textContent = text; t.style.display = "block"; clearTimeout(t._h); t._h = setTimeout(() => t.style.display = "none", 2500); }

async function api(path, body) {
  const opts = {headers: {"X-Curate-Token": TOKEN}};
  if (body !== undefined) Object.assign(opts, {method: "POST", body: JSON.stringify(body)}, {headers: {"X-Curate-Token": TOKEN, "Content-Type": "application/json"}});
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) { toast("error: " + (data.error || r.status)); throw new Error(data.error); }
  return data;
}

// --- loading ------------------------------------------------------------------------

async function load(keepPlace) {
  const data = await api("/api/state");
  const curKey = keepPlace && S.filtered[S.cur] ? [S.filtered[S.cur].m, S.filtered[S.cur].key] : null;
  S.manifests = data.manifests; S.vocab = data.vocab; S.dec = data.decisions; S.history = data.history;
  S.rows = []; S.byKey = [];
  data.rows.forEach((c, m) => {
    const index = new Map();
    for (let i = 0; i < c.key.length; i++) {
      const r = {m, i, key: c.key[i], subset: c.subset[i], w: c.w[i], h: c.h[i], error: c.error[i], dup_of: c.dup_of[i],
                 crop: c.crop[i], caption: c.caption[i], file: c.file[i], tags: c.tags[i], bucket: c.bucket[i]};
      S.rows.push(r); index.set(r.key, r);
    }
    S.byKey.push(index);
  });
  if (!keepPlace) fillControls();
  applyFilters();
  if (curKey) { const k = S.filtered.findIndex(r => r.m === curKey[0] && r.key === curKey[1]); if (k >= 0) openDetail(k); }
  renderSide();
  document.body.dataset.ready = "1";
  if (window.__firstRender === undefined) window.__firstRender = performance.now();
}

function fillControls() {
  const dl = $("vocab"); dl.textContent = "";
  const frag = document.createDocumentFragment();
  for (const t of S.vocab) frag.append(el("option", {value: t.replace(/_/g, " ")}));
  dl.append(frag);
  const sel = $("f-subset");
  const subsets = new Set(S.rows.map(r => sub(r)));
  for (const s of [...subsets].sort()) sel.append(el("option", {value: s, text: s}));
}
const sub = (r) => (S.manifests.length > 1 ? S.manifests[r.m].name + " / " : "") + (r.subset || "(no subset)");
const st = (r) => Object.assign({}, BLANK, (S.dec[r.m] || {})[r.key] || {});
const changed = (s) => s.dropped !== null || s.keeper !== null || s.split || s.box !== null || s.caption !== null;
const tagName = (t) => t.replace(/_/g, " ");
const kept = (r) => !r.error && !r.dup_of && st(r).dropped === null;
const boxOf = (r) => st(r).box || r.crop || [0, 0, r.w || 0, r.h || 0];
const captionOf = (r) => { const s = st(r); return s.caption !== null ? s.caption : (r.caption || ""); };

// --- filters and the grid --------------------------------------------------------------

function applyFilters() {
  const subset = $("f-subset").value, tag = $("f-tag").value.trim().replace(/ /g, "_");
  const text = $("f-text").value.trim().toLowerCase();
  const tagId = tag ? S.vocab.indexOf(tag) : -1;
  const f = {error: $("f-error").checked, dups: $("f-dups").checked, changed: $("f-changed").checked,
             unseen: $("f-unseen").checked, dropped: $("f-dropped").checked, trimmed: $("f-trimmed").checked};
  S.filtered = S.rows.filter(r => {
    if (subset && sub(r) !== subset) return false;
    if (tag && !r.tags.includes(tagId)) return false;
    if (text && !r.key.toLowerCase().includes(text) && !(r.file || "").toLowerCase().includes(text)) return false;
    if (f.error && !r.error) return false;
    if (f.trimmed) { const b = boxOf(r); if (b[0] === 0 && b[1] === 0 && b[2] === r.w && b[3] === r.h) return false; }
    if (f.dups && !r.dup_of && !isKeeperOfOthers(r)) return false;
    const s = st(r);
    if (f.changed && !changed(s)) return false;
    if (f.unseen && (s.seen || changed(s))) return false;
    if (f.dropped && s.dropped === null) return false;
    return true;
  });
  S.cur = -1; $("detail").classList.add("hidden");
  $("grid").textContent = ""; S.shown = 0;
  for (const r of S.rows) r.el = null;
  renderMore();
  $("shown").textContent = `${S.filtered.length} shown`;
  renderCounts();
}

let keeperSet = null;
function isKeeperOfOthers(r) {
  if (!keeperSet) { keeperSet = new Set(); for (const x of S.rows) if (x.dup_of) keeperSet.add(x.dup_of); }
  return keeperSet.has(r.key);
}

function renderMore() {
  const frag = document.createDocumentFragment();
  const end = Math.min(S.filtered.length, S.shown + CHUNK);
  for (let k = S.shown; k < end; k++) frag.append(card(S.filtered[k], k));
  S.shown = end;
  $("grid").append(frag);
}
new IntersectionObserver((es) => { if (es.some(e => e.isIntersecting) && S.shown < S.filtered.length) renderMore(); },
                         {rootMargin: "800px"}).observe(document.getElementById("more") || document.body);

function card(r, k) {
  const img = el("img", {loading: "lazy", alt: r.key, src: "/thumb?" + q(r.m, r.key)});
  const c = el("div", {cls: "card", onclick: (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.shiftKey) toggleSel(r); else openDetail(k);
  }}, img, el("div", {cls: "badges"}), el("div", {cls: "k", text: r.file || r.key, title: r.key}));
  r.el = c; updateCard(r);
  return c;
}

// the crop box drawn on the card's thumbnail of the original (object-fit: contain in 150x120)
function cardBox(r) {
  const old = r.el.querySelector(".cbox"); if (old) old.remove();
  const b = boxOf(r);
  if (!r.w || !r.h || (b[0] === 0 && b[1] === 0 && b[2] === r.w && b[3] === r.h)) return;
  const k = Math.min(150 / r.w, 120 / r.h), x0 = (150 - r.w * k) / 2, y0 = (120 - r.h * k) / 2;
  const box = el("div", {cls: "cbox"});
  Object.assign(box.style, {left: x0 + b[0] * k + "px", top: y0 + b[1] * k + "px",
                            width: (b[2] - b[0]) * k + "px", height: (b[3] - b[1]) * k + "px"});
  r.el.append(box);
}

function updateCard(r) {
  if (!r.el) return;
  cardBox(r);
  const s = st(r);
  r.el.classList.toggle("dropped", s.dropped !== null);
  r.el.classList.toggle("sel", S.sel.has(r));
  const b = r.el.querySelector(".badges"); b.textContent = "";
  if (r.error) b.append(el("b", {cls: "err", text: "error"}));
  if (r.dup_of) b.append(el("b", {cls: "dup", text: "dup"}));
  if (s.dropped !== null) b.append(el("b", {cls: "drop", text: "dropped"}));
  if (s.box !== null || s.caption !== null || s.keeper !== null || s.split) b.append(el("b", {cls: "edit", text: "edited"}));
  else if (s.seen && s.dropped === null) b.append(el("b", {cls: "seen", text: "\u2713"}));
}

function toggleSel(r) { S.sel.has(r) ? S.sel.delete(r) : S.sel.add(r); updateCard(r); $("selected").textContent = `${S.sel.size} selected`; }

function renderCounts() {
  let seen = 0, dropped = 0, edited = 0;
  for (const r of S.rows) { const s = st(r); if (s.seen || changed(s)) seen++; if (s.dropped !== null) dropped++;
    if (s.box !== null || s.caption !== null || s.keeper !== null || s.split) edited++; }
  $("counts").textContent = `${S.rows.length} rows in ${S.manifests.length} manifest(s): ${seen} looked at, ${dropped} dropped, ${edited} edited`;
}

// --- the detail panel ----------------------------------------------------------------------

function openDetail(k) {
  if (k < 0 || k >= S.filtered.length) return;
  while (k >= S.shown) renderMore();
  const prev = S.filtered[S.cur]; if (prev && prev.el) prev.el.classList.remove("cur");
  S.cur = k;
  const r = S.filtered[k];
  if (r.el) { r.el.classList.add("cur"); r.el.scrollIntoView({block: "nearest"}); }
  $("detail").classList.remove("hidden");
  $("detail").scrollTop = 0;
  $("d-title").textContent = r.file || r.key;
  const meta = $("d-meta"); meta.textContent = "";
  meta.append(el("div", {text: `${r.key} \u00b7 ${sub(r)} \u00b7 ${r.w}x${r.h}`}));
  if (r.error) meta.append(el("div", {cls: "err", text: "error: " + r.error}));
  if (r.dup_of) meta.append(el("div", {text: "duplicate of " + r.dup_of}));
  const img = $("d-img");
  img.onload = () => drawBox(boxOf(r));
  img.src = "/original?" + q(r.m, r.key); img.alt = r.key;
  $("d-orig").href = "/original?" + q(r.m, r.key);
  drawBox(boxOf(r)); showBucket(boxOf(r));
  renderStatus(r); renderCaption(r); renderCluster(r);
}
const cur = () => S.filtered[S.cur];

function renderStatus(r) {
  const s = st(r), d = $("d-status"); d.textContent = "";
  if (s.dropped !== null) d.append(el("span", {cls: "drop", text: "dropped" + (s.dropped ? ": " + s.dropped : "")}));
  else d.append(el("span", {text: s.seen || changed(s) ? "kept (looked at)" : "not looked at yet"}));
  $("c-who").textContent = s.box ? "(chosen by a person)" : "(automatic)";
}

// crop box: drawn over the original, dragged by its edges or moved whole; numbers typed below
function scale() { const img = $("d-img"), r = cur(); return r && img.clientWidth ? img.clientWidth / r.w : 0; }
function drawBox(b) {
  const k = scale(), box = $("d-box");
  ["l", "t", "r", "b"].forEach((n, i) => $("c-" + n).value = b[i]);
  if (!k) { box.style.display = "none"; return; }
  Object.assign(box.style, {display: "block", left: b[0] * k + "px", top: b[1] * k + "px",
                            width: (b[2] - b[0]) * k + "px", height: (b[3] - b[1]) * k + "px"});
}
let bucketTimer = null;
function showBucket(b) {
  $("c-size").textContent = `${b[2] - b[0]}x${b[3] - b[1]}`;
  clearTimeout(bucketTimer);
  bucketTimer = setTimeout(async () => {
    const res = await api(`/api/bucket?w=${b[2] - b[0]}&h=${b[3] - b[1]}`);
    $("c-bucket").textContent = res.bucket || "none";
    const r = cur(); if (r && !drag) r.decidedBucket = res.bucket;
  }, 30);
}
const MIN_BOX = 16;  // decisions.MIN_BOX
function clampBox(b, r) {
  let [l, t, rr, bb] = b.map(v => Math.round(v));
  const mw = Math.min(MIN_BOX, r.w), mh = Math.min(MIN_BOX, r.h);  // the server's smallest box
  l = Math.max(0, Math.min(l, r.w - mw)); t = Math.max(0, Math.min(t, r.h - mh));
  rr = Math.max(l + mw, Math.min(rr, r.w)); bb = Math.max(t + mh, Math.min(bb, r.h));
  return [l, t, rr, bb];
}
let drag = null;
$("d-box").addEventListener("mousedown", (ev) => {
  const r = cur(); if (!r) return;
  ev.preventDefault();
  const edge = ev.target.classList.contains("h") ? [...ev.target.classList].find(c => c !== "h") : "move";
  drag = {edge, x: ev.clientX, y: ev.clientY, start: boxOf(r).slice(), box: boxOf(r).slice(), r};
});
window.addEventListener("mousemove", (ev) => {
  if (!drag) return;
  const k = scale(), dx = (ev.clientX - drag.x) / k, dy = (ev.clientY - drag.y) / k, [l, t, r, b] = drag.start;
  let nb;
  if (drag.edge === "l") nb = [l + dx, t, r, b]; else if (drag.edge === "r") nb = [l, t, r + dx, b];
  else if (drag.edge === "t") nb = [l, t + dy, r, b]; else if (drag.edge === "b") nb = [l, t, r, b + dy];
  else { const mx = Math.max(-l, Math.min(dx, drag.r.w - r)), my = Math.max(-t, Math.min(dy, drag.r.h - b)); nb = [l + mx, t + my, r + mx, b + my]; }
  drag.box = clampBox(nb, drag.r); drawBox(drag.box); showBucket(drag.box);
});
window.addEventListener("mouseup", () => {
  if (!drag) return;
  const d = drag; drag = null;
  if (d.box.join() !== d.start.join()) decide(d.r, {action: "crop", box: d.box});
});
["l", "t", "r", "b"].forEach(n => $("c-" + n).addEventListener("change", () => {
  const r = cur(); if (!r || ["l", "t", "r", "b"].some(x => $("c-" + x).value === "")) return;
  const b = clampBox(["l", "t", "r", "b"].map(x => +$("c-" + x).value), r);
  drawBox(b); showBucket(b); decide(r, {action: "crop", box: b});
}));
$("c-reset").onclick = () => { const r = cur(); if (r) decide(r, {action: "crop", box: null}); };

// caption: a text box and the same text as chips (remove, move, add from the vocabulary)
function splitTags(text) { return text.split(",").map(t => t.trim()).filter(Boolean); }
function renderCaption(r) {
  const text = captionOf(r);
  $("d-caption").value = text;
  renderChips(splitTags(text));
}
function renderChips(tags) {
  const box = $("chips"); box.textContent = "";
  tags.forEach((t, i) => {
    const move = (to) => () => { const a = splitTags($("d-caption").value); if (to < 0 || to >= a.length) return;
      [a[i], a[to]] = [a[to], a[i]]; setCaptionText(a.join(", ")); };
    box.append(el("span", {cls: "chip"}, el("span", {text: t}),
      el("button", {text: "\u2190", title: "move left", onclick: move(i - 1)}),
      el("button", {text: "\u2192", title: "move right", onclick: move(i + 1)}),
      el("button", {text: "\u00d7", title: "remove", onclick: () => { const a = splitTags($("d-caption").value); a.splice(i, 1); setCaptionText(a.join(", ")); }})));
  });
}
function setCaptionText(text) { $("d-caption").value = text; renderChips(splitTags(text)); }
$("d-caption").addEventListener("input", () => renderChips(splitTags($("d-caption").value)));
$("chip-add-go").onclick = () => { const t = $("chip-add").value.trim(); if (!t) return;
  setCaptionText(splitTags($("d-caption").value).concat([tagName(t)]).join(", ")); $("chip-add").value = ""; };
$("cap-save").onclick = () => { const r = cur(); if (r) decide(r, {action: "caption", text: $("d-caption").value}); };
$("cap-reset").onclick = () => { const r = cur(); if (r) decide(r, {action: "caption", text: null}); };

// duplicate cluster of the current row: keeper first; choose another keeper or split one out
function clusterOf(r) {
  const root = r.dup_of || r.key;
  const members = S.rows.filter(x => x.m === r.m && (x.dup_of === root || x.key === root));
  return members.length > 1 || r.dup_of ? {root, members} : null;
}
function renderCluster(r) {
  const box = $("d-cluster"); box.textContent = "";
  const c = clusterOf(r);
  if (!c) { box.append(el("span", {cls: "empty", text: "not in a duplicate cluster"})); return; }
  box.append(clusterView(c, r.m));
}
function clusterView(c, m) {
  const div = el("div", {cls: "cluster"});
  const members = c.members.slice().sort((a, b) => (a.dup_of ? 1 : 0) - (b.dup_of ? 1 : 0));
  if (!S.byKey[m].has(c.root)) div.append(el("div", {cls: "member keeper"}, el("div", {text: "keeper " + c.root + " is in another manifest"})));
  for (const x of members) {
    const keeper = !x.dup_of;
    div.append(el("div", {cls: "member" + (keeper ? " keeper" : "")},
      el("img", {loading: "lazy", src: "/thumb?" + q(x.m, x.key), alt: x.key}),
      el("div", {text: (keeper ? "KEEP " : "dup ") + (x.file || x.key)}),
      el("div", {cls: "why", text: keeper ? (st(x).keeper !== null ? "chosen by a person" : "most pixels") : (st(x).split ? "" : "near or exact duplicate")}),
      keeper ? null : el("button", {text: "Make keeper", onclick: () => decide(x, {action: "keeper"})}),
      el("button", {text: "Split out", onclick: () => decide(x, {action: "split"})})));
  }
  return div;
}

// --- decisions ------------------------------------------------------------------------------

async function decideMany(rows, line) {
  const byM = new Map();
  for (const r of rows) { if (!byM.has(r.m)) byM.set(r.m, []); byM.get(r.m).push({key: r.key, ...line}); }
  let structural = ["keeper", "split"].includes(line.action);
  for (const [m, lines] of byM) {
    const res = await api("/api/decide", {m, lines});
    took(m, res);
  }
  if (structural) return load(true);
  for (const r of rows) updateCard(r);
  const r = cur(); if (r && rows.includes(r)) { renderStatus(r); renderCaption(r); drawBox(boxOf(r)); showBucket(boxOf(r)); }
  renderCounts(); renderSide();
}
function took(m, res) {
  S.dec[m] = S.dec[m] || {};
  Object.assign(S.dec[m], res.state);
  for (const rec of res.records) { S.history.unshift(rec); S.mine.push(rec); }
  window.__lastDecision = performance.now();
}
const decide = (r, line) => decideMany([r], line);

async function undo(rec) {
  const res = await api("/api/decide", {m: rec.m, undo: [rec.id]});
  took(rec.m, res);
  await load(true);
  toast("undone: " + rec.action + " " + rec.key);
}

$("d-drop").onclick = () => { const r = cur(); if (r) decide(r, {action: "drop", reason: $("d-reason").value}); };
$("d-keep").onclick = () => keep();
function keep() { const r = cur(); if (!r) return; decide(r, st(r).dropped !== null ? {action: "restore"} : {action: "seen"}); }
$("sel-drop").onclick = () => { if (S.sel.size) decideMany([...S.sel], {action: "drop", reason: $("sel-reason").value}); };
$("sel-restore").onclick = () => { if (S.sel.size) decideMany([...S.sel], {action: "restore"}); };
$("sel-clear").onclick = () => { const a = [...S.sel]; S.sel.clear(); a.forEach(updateCard); $("selected").textContent = "0 selected"; };
$("tag-drop-go").onclick = () => {
  const tag = $("tag-drop").value.trim().replace(/ /g, "_"), id = S.vocab.indexOf(tag);
  const rows = id < 0 ? [] : S.rows.filter(r => r.tags.includes(id) && st(r).dropped === null);
  if (!rows.length) return toast("no kept image has that tag");
  if (confirm(`Drop ${rows.length} images tagged ${tagName(tag)}?`)) decideMany(rows, {action: "drop", reason: "tag " + tagName(tag)});
};

// --- the other views ------------------------------------------------------------------------

function bars(counts, total, onclick) {
  const top = Math.max(1, ...counts.map(c => c[1]));
  return el("div", {cls: "bars"}, ...counts.map(([label, n]) => el("div", {cls: "bar" + (onclick ? " click" : ""), onclick: onclick ? () => onclick(label) : null},
    el("span", {cls: "label", text: label, title: label}),
    el("span", {cls: "track"}, el("span", {cls: "fill", style: `width:${(100 * n / top).toFixed(1)}%`})),
    el("span", {cls: "n", text: `${n}` + (total ? ` (${Math.round(100 * n / total)}%)` : "")}))));
}
function renderSide() {
  const view = document.querySelector("nav button.on").dataset.view;
  if (view === "duplicates") renderDuplicates();
  if (view === "charts") renderCharts();
  if (view === "history") renderHistory();
}
function renderDuplicates() {
  const box = $("duplicates"); box.textContent = "";
  const groups = new Map();
  for (const r of S.rows) if (r.dup_of) { const id = r.m + "\u0000" + r.dup_of; if (!groups.has(id)) groups.set(id, {root: r.dup_of, m: r.m, members: []}); groups.get(id).members.push(r); }
  for (const g of groups.values()) { const k = S.byKey[g.m].get(g.root); if (k) g.members.unshift(k); }
  box.append(el("p", {text: `${groups.size} clusters; the keeper is outlined green, the others are left out of training.`}));
  for (const g of [...groups.values()].slice(0, 500)) box.append(clusterView(g, g.m));
}
function renderCharts() {
  const box = $("charts"); box.textContent = "";
  const used = S.rows.filter(kept), tags = new Map(), buckets = new Map();
  for (const r of used) {
    for (const t of r.tags) tags.set(t, (tags.get(t) || 0) + 1);
    const b = st(r).box ? (r.decidedBucket || r.bucket) : r.bucket;
    if (b) buckets.set(b, (buckets.get(b) || 0) + 1);
  }
  const top = [...tags].sort((a, b) => b[1] - a[1]).slice(0, 30).map(([t, n]) => [tagName(S.vocab[t]), n]);
  const per = new Map();
  for (const r of S.rows) {
    const c = per.get(sub(r)) || [0, 0, 0, 0, 0, 0]; const s = st(r);
    c[0]++; c[1] += kept(r); c[2] += !!r.dup_of; c[3] += !!r.error; c[4] += s.dropped !== null; c[5] += s.seen || changed(s);
    per.set(sub(r), c);
  }
  const head = el("tr", {}, ...["subset", "rows", "kept", "duplicates", "errors", "dropped", "looked at"].map(t => el("th", {text: t})));
  box.append(el("h3", {text: "Subsets"}), el("table", {cls: "subsets"}, head,
    ...[...per].map(([name, c]) => el("tr", {}, el("td", {text: name}), ...c.map(n => el("td", {text: String(n)}))))));
  box.append(el("div", {cls: "charts"},
    el("div", {cls: "chart"}, el("h3", {text: `Top tags (${used.length} kept images; click to filter)`}),
       bars(top, used.length, (label) => { $("f-tag").value = label; show("images"); applyFilters(); })),
    el("div", {cls: "chart"}, el("h3", {text: "Buckets"}), bars([...buckets].sort((a, b) => b[1] - a[1]).slice(0, 20), used.length))));
}
function renderHistory() {
  const box = $("history"); box.textContent = "";
  const undone = new Set(S.history.filter(h => h.action === "undo").map(h => h.of));
  const table = el("table", {cls: "hist"});
  for (const h of S.history) {
    const what = h.action === "undo" ? "undo" : h.action + (h.reason ? ": " + h.reason : "") + (h.box ? " " + JSON.stringify(h.box) : "") + (h.text != null ? " \u201c" + h.text + "\u201d" : "");
    table.append(el("tr", {cls: undone.has(h.id) ? "undone" : ""}, el("td", {text: h.at}), el("td", {text: h.who}),
      el("td", {text: h.key}), el("td", {text: what}),
      el("td", {}, el("button", {text: "Undo", onclick: () => undo(h)}))));
  }
  box.append(el("p", {text: `${S.history.length} decisions, newest first`}), table);
}
function show(view) {
  document.querySelectorAll("nav button").forEach(b => b.classList.toggle("on", b.dataset.view === view));
  document.querySelectorAll(".view").forEach(v => v.classList.toggle("hidden", v.id !== view));
  renderSide();
}
document.querySelectorAll("nav button").forEach(b => b.onclick = () => show(b.dataset.view));
for (const id of ["f-subset", "f-tag", "f-text", "f-error", "f-dups", "f-trimmed", "f-changed", "f-unseen", "f-dropped"])
  $(id).addEventListener("change", () => { keeperSet = null; applyFilters(); });

// --- keyboard triage ---------------------------------------------------------------------------
document.addEventListener("keydown", (ev) => {
  if (ev.target.matches("input, textarea, select") || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const k = ev.key;
  if (k === "j" || k === "ArrowRight") openDetail(Math.min(S.cur + 1, S.filtered.length - 1));
  else if (k === "k" || k === "ArrowLeft") openDetail(Math.max(S.cur - 1, 0));
  else if (k === "a") { keep(); openDetail(S.cur + 1); }
  else if (k === "d") { const r = cur(); if (r) { decide(r, {action: "drop", reason: $("d-reason").value}); openDetail(S.cur + 1); } }
  else if (k === "o") { const r = cur(); if (r) window.open("/original?" + q(r.m, r.key), "_blank", "noopener"); }
  else if (k === "x") { const r = cur(); if (r) toggleSel(r); }
  else if (k === "u") { const rec = S.mine.pop(); if (rec) undo(rec); }
  else return;
  ev.preventDefault();
});

load(false);
