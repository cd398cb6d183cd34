// Upload page: send the file, show every model's predictions, then heat maps of the top class.
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
  document.getElementById("limits").textContent = "PNG, JPEG or DICOM, at most " + info.max_upload_mb +
    " MB. Models: " + info.models.map((m) => m.name + " (" + m.model + ")").join(", ") + ".";
  const explainer = new cx.Explainer(document.getElementById("explain"), info);
  const form = document.getElementById("upload-form");
  const button = document.getElementById("upload-button");

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = document.getElementById("file").files[0];
    if (!file) {
      cx.status(status, "choose an image file first", true);
      return;
    }
    if (file.size > info.max_upload_mb * 1024 * 1024) {
      cx.status(status, file.name + " is larger than " + info.max_upload_mb + " MB", true);
      return;
    }
    const data = new FormData();
    data.append("file", file);
    button.disabled = true;
    cx.status(status, "predicting " + file.name + " ...");
    try {
      const result = await cx.api("/api/predict", { method: "POST", body: data });
      document.getElementById("xray").src = result.xray;
      document.getElementById("xray-caption").textContent =
        result.name + ", " + result.width + " x " + result.height + " px (contrast-stretched for display)";
      document.getElementById("predictions").replaceChildren(cx.predictionTable(result));
      document.getElementById("result").classList.remove("hidden");
      cx.status(status, "");
      await explainer.show({ upload_id: result.upload_id }, cx.topClass(result));
    } catch (error) {
      cx.status(status, error.message, true);
    } finally {
      button.disabled = false;
    }
  });
})();
