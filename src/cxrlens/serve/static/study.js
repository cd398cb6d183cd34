// Reader study: a rater scores each anonymised map 1-5; scores go to /api/ratings.
"use strict";

(function () {
  const status = document.getElementById("status");
  const maps = document.getElementById("study-maps");
  const submit = document.getElementById("submit");
  const slider = document.getElementById("opacity");
  let rater = null;
  let current = null;

  function applyOpacity() {
    document.getElementById("opacity-value").textContent = slider.value + " %";
    for (const img of maps.querySelectorAll("img.overlay")) img.style.opacity = String(Number(slider.value) / 100);
  }

  function updateSubmit() {
    const rated = maps.querySelectorAll("input[type=radio]:checked").length;
    submit.disabled = !current || rated < current.maps.length;
  }

  async function next() {
    cx.status(status, "loading the next image and computing its maps ...");
    maps.replaceChildren();
    submit.disabled = true;
    try {
      current = await cx.api("/api/study/next?rater=" + encodeURIComponent(rater));
    } catch (error) {
      cx.status(status, error.message, true);
      return;
    }
    cx.status(status, "");
    if (current.done) {
      document.getElementById("task").classList.add("hidden");
      document.getElementById("finished").classList.remove("hidden");
      loadSummary();
      return;
    }
    document.getElementById("task").classList.remove("hidden");
    document.getElementById("progress").textContent = "image " + current.position + " of " + current.total;
    document.getElementById("finding").textContent = "finding: " + current.cls;
    for (const m of current.maps) {
      const scores = cx.el("div", { class: "scores", role: "radiogroup", "aria-label": "score of map " + m.label });
      for (let s = 1; s <= 5; s++) {
        const input = cx.el("input", { type: "radio", name: "score-" + m.token, value: String(s), "data-token": m.token });
        input.addEventListener("change", updateSubmit);
        scores.append(cx.el("label", { title: s === 1 ? "looks elsewhere" : s === 5 ? "looks at the pathology" : "" }, input, String(s)));
      }
      const stack = cx.el("div", { class: "stack" },
        cx.el("img", { class: "xray-base", src: m.xray, alt: "X-ray" }),
        cx.el("img", { class: "overlay", src: m.heatmap, alt: "map " + m.label }));
      maps.append(cx.el("div", { class: "study-map", "data-label": m.label }, cx.el("h3", { text: "Map " + m.label }), stack, scores));
    }
    applyOpacity();
  }

  async function save() {
    const ratings = [];
    for (const input of maps.querySelectorAll("input[type=radio]:checked")) {
      ratings.push({ token: input.dataset.token, score: Number(input.value) });
    }
    submit.disabled = true;
    try {
      const saved = await cx.postJSON("/api/ratings", { rater: rater, image_id: current.image_id, ratings: ratings });
      cx.status(status, "saved " + saved.saved + " scores");
      await next();
    } catch (error) {
      cx.status(status, error.message, true);
      updateSubmit();
    }
  }

  function fmt(v, digits) { return v === null || v === undefined ? "n/a" : Number(v).toFixed(digits); }

  async function loadSummary() {
    const box = document.getElementById("summary");
    try {
      const s = await cx.api("/api/ratings/summary");
      const parts = [cx.el("p", { text: s.n_ratings + " ratings by " + s.raters.length + " rater(s) of " + s.n_images +
        " images; Fleiss' kappa over the " + s.n_maps_multi_rated + " maps rated by two or more raters: " + fmt(s.fleiss_kappa, 3) })];
      for (const [title, table] of [["model", s.by_model], ["method", s.by_method]]) {
        const head = cx.el("tr", {}, cx.el("th", { text: title }), cx.el("th", { text: "mean score" }), cx.el("th", { text: "n" }));
        const t = cx.el("table", { class: "summary-" + title }, head);
        for (const [name, v] of Object.entries(table)) {
          t.append(cx.el("tr", {}, cx.el("td", { text: name }), cx.el("td", { text: fmt(v.mean, 2) }), cx.el("td", { text: String(v.n) })));
        }
        parts.push(t);
      }
      box.replaceChildren(...parts);
    } catch (error) {
      box.textContent = error.message;
    }
  }

  slider.addEventListener("input", applyOpacity);
  submit.addEventListener("click", save);
  document.getElementById("summary-box").addEventListener("toggle", loadSummary);
  document.getElementById("rater-form").addEventListener("submit", (event) => {
    event.preventDefault();
    rater = document.getElementById("rater").value.trim();
    document.getElementById("login").classList.add("hidden");
    next();
  });
})();
