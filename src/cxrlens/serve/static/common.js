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
    this.cancelButton = cx.el("button", { type: "button", id: "explain-cancel", class: "hidden", text: "Cancel" });
    this.job = null;  // id of the job being shown
    this.runs = 0;  // bumped by every new request, so that a superseded one stops updating the page
    this.maps = cx.el("div", { class: "heatmaps", id: "heatmaps" });
    this.caption = cx.el("p", { class: "note", id: "explain-caption" });
    const controls = cx.el("div", { class: "controls" },
      cx.el("label", {}, "method ", this.method),
      cx.el("label", {}, "class ", this.cls),
      cx.el("label", {}, "heat-map opacity ", this.slider, " ", this.sliderValue), this.cancelButton);
    container.append(cx.el("h2", { text: "Explanations" }), controls, this.status, this.maps, this.caption);
    this.method.addEventListener("change", () => this.run());
    this.cls.addEventListener("change", () => this.run());
    this.slider.addEventListener("input", () => this.applyOpacity());
    this.cancelButton.addEventListener("click", () => this.cancel(true));
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

  // Explaining is a job on the server: each model's map appears as soon as it is ready, with an
  // estimate of the time left; Cancel (or asking for another method or class) stops it there too.
  async run() {
    if (!this.source) return;
    const run = ++this.runs;
    await this.cancel(false);
    const request = { ...this.source, method: this.method.value, cls: this.cls.value };
    this.maps.replaceChildren();
    this.caption.textContent = "";
    cx.status(this.status, "starting " + request.method.replace(/_/g, " ") + " for " + request.cls + " ...");
    try {
      let job = await cx.postJSON("/api/jobs/explain", request);
      if (run !== this.runs) { cx.cancelJob(job.id); return; }
      this.job = job.id;
      this.cancelButton.classList.remove("hidden");
      while (run === this.runs) {
        this.render(job);
        if (job.state !== "queued" && job.state !== "running") break;
        await cx.sleep(cx.pollMs);
        if (run !== this.runs) return;
        job = await cx.api("/api/jobs/" + job.id);
      }
    } catch (error) {
      if (run === this.runs) cx.status(this.status, error.message, true);
    } finally {
      if (run === this.runs) { this.job = null; this.cancelButton.classList.add("hidden"); }
    }
  }

  // show the maps that are new in this poll, and the job's state in the status line
  render(job) {
    for (const m of job.maps.slice(this.maps.children.length)) this.maps.append(this.figure(m));
    this.applyOpacity();
    const what = job.method.replace(/_/g, " ") + " for " + job.cls;
    if (job.state === "queued") {
      cx.status(this.status, what + (job.position ? ": waiting for " + job.position + " job(s) ahead ..." : ": starting ..."));
    } else if (job.state === "running") {
      const left = job.estimate_seconds === null ? "" : ", about " + Math.ceil(job.estimate_seconds) + " s left";
      cx.status(this.status, what + ": " + job.models_done + " of " + job.models_total + " models done" + left + " ...");
    } else if (job.state === "done") {
      cx.status(this.status, "");
      const colours = job.maps.length && job.maps[0].signed
        ? "blue = evidence against, red = evidence for" : "magma: bright = high attribution";
      this.caption.textContent = what.replace(" for ", " (" + job.description + ") for class ") +
        ", computed on each model's input image; " + colours + "; values clipped at the 99th percentile of |map|.";
    } else if (job.state === "cancelled") {
      cx.status(this.status, what + ": cancelled after " + job.models_done + " of " + job.models_total + " models");
    } else {
      cx.status(this.status, job.error || "the explanation failed", true);
    }
  }

  figure(m) {
    const overlay = cx.el("img", { class: "overlay", src: m.heatmap, alt: "heat map of " + m.model });
    const stack = cx.el("div", { class: "stack" }, cx.el("img", { class: "xray-base", src: m.xray, alt: "input of " + m.model }), overlay);
    const score = m.score === null ? "" : ", explained probability " + m.score.toFixed(3);
    return cx.el("figure", { class: "heatmap" }, stack,
      cx.el("figcaption", { text: m.model + " (" + m.arch + ")" + score + ", " + m.seconds.toFixed(2) + " s" }));
  }

  // stop the running job, if any; the server frees its worker at the next forward pass
  async cancel(byUser) {
    const id = this.job;
    if (!id) return;
    this.job = null;
    this.cancelButton.classList.add("hidden");
    if (byUser) {
      const run = ++this.runs;
      cx.status(this.status, "cancelling ...");
      const job = await cx.cancelJob(id);
      if (run !== this.runs) return;
      let state = job;
      while (state && state.state === "running" && run === this.runs) {  // until the worker has stopped
        await cx.sleep(cx.pollMs);
        state = await cx.api("/api/jobs/" + id).catch(() => null);
      }
      if (state && run === this.runs) this.render(state);
    } else {
      cx.cancelJob(id);
    }
  }
};

cx.pollMs = 300;
cx.sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
cx.cancelJob = (id) => cx.api("/api/jobs/" + id, { method: "DELETE" }).catch(() => null);

cx.topClass = function (result) {
  const soft = result.ensembles[0].probs;
  return result.classes.reduce((a, b) => (soft[b] > soft[a] ? b : a));
};
