// curate review: issue 27's judgement on the page (after app.js). Score sort and threshold
// in the filters, sharpness / effective resolution / how a duplicate matched in the detail
// panel, the tags that will overfit beside the tag charts. Wraps app.js's functions.
"use strict";
const J = {cols: [], overfit: []};
const jval = (r, c) => ((J.cols[r.m] || {})[c] || [])[r.i];

const apiPlain = api;
api = async function (path, body) {  // every later state load carries the judgement
  const data = await apiPlain(path, body);
  if (path === "/api/state" && data) { J.cols = data.judgement || []; J.overfit = data.overfit || []; document.body.dataset.judged = "1"; }
  return data;
};
// the first state load began before this script ran: fetch the judgement alone
apiPlain("/api/judgement").then((d) => {
  if (!d || J.cols.length) return;
  J.cols = d.judgement || []; J.overfit = d.overfit || [];
  document.body.dataset.judged = "1";
  if ($("f-sort").value || $("f-min-aesthetic").value) applyFilters();
});

(function controls() {
  const f = $("filters"), shown = $("shown");
  const sort = el("select", {id: "f-sort"}, el("option", {value: "", text: "manifest order"}),
    el("option", {value: "aesthetic", text: "aesthetic, best first"}), el("option", {value: "-aesthetic", text: "aesthetic, worst first"}),
    el("option", {value: "sharpness", text: "sharpness, sharpest first"}));
  const min = el("input", {id: "f-min-aesthetic", type: "number", step: "0.1", size: 5, placeholder: "any"});
  f.insertBefore(el("label", {}, "sort ", sort), shown);
  f.insertBefore(el("label", {}, "aesthetic \u2265 ", min), shown);
  sort.addEventListener("change", () => applyFilters());
  min.addEventListener("change", () => applyFilters());
})();

const applyPlain = applyFilters;
applyFilters = function () {
  applyPlain();
  const key = $("f-sort").value, min = parseFloat($("f-min-aesthetic").value);
  if (!key && isNaN(min)) return;
  let rows = S.filtered;
  if (!isNaN(min)) rows = rows.filter(r => jval(r, "aesthetic") !== null && jval(r, "aesthetic") >= min);
  if (key) {
    const c = key.replace("-", ""), sign = key.startsWith("-") ? 1 : -1;
    const v = (r) => { const x = jval(r, c); return x === null || x === undefined ? null : x; };
    rows = rows.slice().sort((a, b) => (v(a) === null) - (v(b) === null) || sign * (v(a) - v(b)));
  }
  S.filtered = rows;
  $("grid").textContent = ""; S.shown = 0;
  for (const r of S.rows) r.el = null;
  renderMore();
  $("shown").textContent = `${S.filtered.length} shown`;
};

const openPlain = openDetail;
openDetail = function (k) {
  openPlain(k);
  const r = S.filtered[k]; if (!r) return;
  const parts = [];
  const a = jval(r, "aesthetic"), s = jval(r, "sharpness"), px = jval(r, "effective_px"), how = jval(r, "dup_reason");
  if (a !== null && a !== undefined) parts.push(`aesthetic ${a.toFixed(2)}`);
  if (s !== null && s !== undefined) parts.push(`sharpness ${s.toFixed(2)}`);
  if (px && r.w && r.h && px < 0.9 * r.w * r.h) parts.push(`drawn at ~${Math.round(Math.sqrt(px / (r.w * r.h)) * r.w)}px wide (upscaled)`);
  if (how && r.dup_of) parts.push(how);
  if (parts.length) $("d-meta").append(el("div", {cls: "judge", text: parts.join(" \u00b7 ")}));
};

const chartsPlain = renderCharts;
renderCharts = function () {
  chartsPlain();
  const box = $("charts");
  J.overfit.forEach((tags, m) => {
    if (!tags.length) return;
    const t = el("table", {cls: "subsets overfit"}, el("tr", {}, ...["tag", "training", "base", "ratio", "what it means"].map(x => el("th", {text: x}))),
      ...tags.slice(0, 40).map(d => el("tr", {}, el("td", {text: tagName(d.tag)}), el("td", {text: `${Math.round(100 * d.share)}%`}),
        el("td", {text: `${(100 * d.base).toFixed(2)}%`}), el("td", {text: `${Math.round(d.ratio)}x`}), el("td", {text: d.meaning}))));
    box.append(el("h3", {text: `Tags that will overfit (${S.manifests[m].name})`}), t);
  });
};
