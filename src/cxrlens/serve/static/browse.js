// Browse page: filter the test split by true class, source and correctness; click for details.
"use strict";

(async function () {
  const status = document.getElementById("status");
  let info;
  try {
    info = await cx.loadInfo();
  } catch (error) {
    cx.status(status, "cannot reach the server: " + error.message, true);
    return;
  }
  if (!info.dataset) {
    cx.status(status, "This server has no data set: start it with --data to browse a test split.", true);
    document.getElementById("filters").classList.add("hidden");
    return;
  }
  const classSelect = document.getElementById("filter-class");
  const sourceSelect = document.getElementById("filter-source");
  const correctSelect = document.getElementById("filter-correct");
  for (const c of info.classes) classSelect.append(cx.el("option", { value: c, text: c }));
  for (const s of info.dataset.sources) sourceSelect.append(cx.el("option", { value: s, text: s }));
  const grid = document.getElementById("grid");
  const more = document.getElementById("more");
  const explainer = new cx.Explainer(document.getElementById("explain"), info);
  const pageSize = 60;
  let offset = 0;

  async function load(reset) {
    if (reset) { offset = 0; grid.replaceChildren(); }
    const params = new URLSearchParams({ correct: correctSelect.value, offset: String(offset), limit: String(pageSize) });
    if (classSelect.value) params.set("cls", classSelect.value);
    if (sourceSelect.value) params.set("source", sourceSelect.value);
    cx.status(status, "loading (the first time, every model predicts the whole split) ...");
    try {
      const result = await cx.api("/api/dataset?" + params);
      document.getElementById("count").textContent = result.matched + " of " + result.total + " images (" + result.split + " split)";
      for (const item of result.items) grid.append(card(item));
      offset += result.items.length;
      more.classList.toggle("hidden", offset >= result.matched);
      cx.status(status, "");
    } catch (error) {
      cx.status(status, error.message, true);
    }
  }

  function card(item) {
    const mark = item.correct ? cx.el("span", { class: "ok", text: "correct" }) : cx.el("span", { class: "bad", text: "wrong" });
    const node = cx.el("div", { class: "card", "data-index": String(item.index), tabindex: "0" },
      cx.el("img", { src: "/api/dataset/" + item.index + "/image", alt: "test image " + item.index, loading: "lazy" }),
      cx.el("div", { text: "#" + item.index + " " + item.label + " (" + item.source + ")" }),
      cx.el("div", {}, "predicted: " + (item.predicted.join(", ") || "none") + " ", mark));
    node.addEventListener("click", () => select(item, node));
    node.addEventListener("keydown", (e) => { if (e.key === "Enter") select(item, node); });
    return node;
  }

  async function select(item, node) {
    for (const c of grid.querySelectorAll(".card.selected")) c.classList.remove("selected");
    node.classList.add("selected");
    document.getElementById("detail").classList.remove("hidden");
    document.getElementById("detail-image").src = "/api/dataset/" + item.index + "/image";
    document.getElementById("detail-caption").textContent = "test image #" + item.index + ", true: " +
      item.truth.join(", ") + ", source: " + item.source;
    try {
      const detail = await cx.api("/api/dataset/" + item.index);
      document.getElementById("detail-predictions").replaceChildren(cx.predictionTable(detail, detail.truth));
      await explainer.show({ index: item.index }, detail.label);
    } catch (error) {
      cx.status(status, error.message, true);
    }
  }

  for (const s of [classSelect, sourceSelect, correctSelect]) s.addEventListener("change", () => load(true));
  more.addEventListener("click", () => load(false));
  await load(true);
})();
