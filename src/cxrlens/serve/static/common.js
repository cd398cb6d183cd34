// Shared helpers of the cxrlens pages: API calls, the predictions table and the heat-map panel.
"use strict";

const cx = {};

cx.el = function (tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
};

// fetch JSON; throws an Error carrying the server's one-line message
cx.api = async function (path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : response.statusText;
    const error = new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
    error.status = response.status;
    throw error;
  }
  return body;
};

cx.postJSON = (path, data) => cx.api(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(data),
});

cx.status = function (node, text, isError) {
  node.textContent = text || "";
  node.classList.toggle("error", Boolean(isError));
};

cx.info = null;
cx.loadInfo = async function () {
  if (!cx.info) cx.info = await cx.api("/api/info");
  return cx.info;
};

// rows: every model, then both ensembles; a cell is the probability, red when positive
cx.predictionTable = function (result, truth) {
  const head = cx.el("tr", {}, cx.el("th", { text: "model" }));
  for (const c of result.classes) head.append(cx.el("th", { text: c }));
  const table = cx.el("table", { id: "predictions-table" }, cx.el("thead", {}, head));
  const body = cx.el("tbody");
  if (truth) {
    const tr = cx.el("tr", {}, cx.el("td", { text: "ground truth" }));
    for (const c of result.classes) tr.append(cx.el("td", { class: truth[c] ? "pos" : "neg", text: truth[c] ? "yes" : "no" }));
    body.append(tr);
  }
  const add = (row, cls) => {
    const tr = cx.el("tr", { class: cls, title: row.detail }, cx.el("td", { text: row.name }));
    for (const c of result.classes) {
      const p = row.probs[c];
      tr.append(cx.el("td", { class: row.positive[c] ? "pos" : "neg", text: p.toFixed(3) + (row.positive[c] ? " +" : "") }));
    }
    body.append(tr);
  };
  result.models.forEach((r) => add(r, "model"));
  result.ensembles.forEach((r) => add(r, "ensemble"));
  table.append(body);
  const caption = cx.el("p", { class: "note", text:
    "Sigmoid probability per class; '+' and red: above the model's threshold. Soft vote: mean probability. " +
    "Majority vote: share of models voting positive, positive above one half." });
  return cx.el("div", {}, table, caption);
};

// The explanation panel: method and class pickers, opacity slider, one overlay per model.
cx.Explainer = class {
  constructor(container, info) {
    this.info = info;
    this.source = null;
    this.method = cx.el("select", { id: "method" });
    for (const m of info.methods) {
      const option = cx.el("option", { value: m.name, text: m.name.replace(/_/g, " "), title: m.description });
      if (m.name === info.default_method) option.selected = true;
      this.method.append(option);
    }
    this.cls = cx.el("select", { id: "explain-class" });
    for (const c of info.classes) this.cls.append(cx.el("option", { value: c, text: c }));
    this.slider = cx.el("input", { type: "range", id: "opacity", min: "0", max: "100", value: "60" });
    this.sliderValue = cx.el("span", { id: "opacity-value", text: "60 %" });
    this.status = cx.el("div", { class: "status", id: "explain-status", role: "status" });
    this.maps = cx.el("div", { class: "heatmaps", id: "heatmaps" });
    this.caption = cx.el("p", { class: "note", id: "explain-caption" });
    const controls = cx.el("div", { class: "controls" },
      cx.el("label", {}, "method ", this.method),
      cx.el("label", {}, "class ", this.cls),
      cx.el("label", {}, "heat-map opacity ", this.slider, " ", this.sliderValue));
    container.append(cx.el("h2", { text: "Explanations" }), controls, this.status, this.maps, this.caption);
    this.method.addEventListener("change", () => this.run());
    this.cls.addEventListener("change", () => this.run());
    this.slider.addEventListener("input", () => this.applyOpacity());
  }

  applyOpacity() {
    const value = Number(this.slider.value);
    this.sliderValue.textContent = value + " %";
    for (const img of this.maps.querySelectorAll("img.overlay")) img.style.opacity = String(value / 100);
  }

  // source: {upload_id} or {index}; cls: class to explain first (e.g. the top prediction)
  async show(source, cls) {
    this.source = source;
    if (cls) this.cls.value = cls;
    await this.run();
  }

  async run() {
    if (!this.source) return;
    const request = { ...this.source, method: this.method.value, cls: this.cls.value };
    cx.status(this.status, "computing " + request.method.replace(/_/g, " ") + " maps for " + request.cls + " ...");
    this.maps.replaceChildren();
    this.caption.textContent = "";
    try {
      const result = await cx.postJSON("/api/explain", request);
      for (const m of result.maps) {
        const overlay = cx.el("img", { class: "overlay", src: m.heatmap, alt: "heat map of " + m.model });
        const stack = cx.el("div", { class: "stack" }, cx.el("img", { class: "xray-base", src: m.xray, alt: "input of " + m.model }), overlay);
        const score = m.score === null ? "" : ", explained probability " + m.score.toFixed(3);
        this.maps.append(cx.el("figure", { class: "heatmap" }, stack,
          cx.el("figcaption", { text: m.model + " (" + m.arch + ")" + score + ", " + m.seconds.toFixed(2) + " s" })));
      }
      this.applyOpacity();
      const colours = result.maps.length && result.maps[0].signed
        ? "blue = evidence against, red = evidence for" : "magma: bright = high attribution";
      this.caption.textContent = result.method.replace(/_/g, " ") + " (" + result.description + ") for class " +
        result.cls + ", computed on each model's input image; " + colours +
        "; values clipped at the 99th percentile of |map|.";
      cx.status(this.status, "");
    } catch (error) {
      cx.status(this.status, error.message, true);
    }
  }
};

cx.topClass = function (result) {
  const soft = result.ensembles[0].probs;
  return result.classes.reduce((a, b) => (soft[b] > soft[a] ? b : a));
};
