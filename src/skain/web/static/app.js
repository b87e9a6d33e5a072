// skAIn page: choose/drop an image, POST it to /api/predict, animate the answer. No ML here.
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const model = JSON.parse($("model-data").textContent);
  const names = Object.fromEntries(model.classes.map((c) => [c.code, c]));
  // Fields the page renders itself; any other field of the prediction is listed under "More outputs".
  const KNOWN = new Set(["diagnosis", "probability", "probabilities", "name", "description", "malignant",
    "ranking", "model_id", "inputs", "heatmap", "rejected", "triage", "triage_figures", "in_distribution"]);
  // What the server decodes (skain.data.images.SUPPORTED_FORMATS); an empty type (HEIC on some systems) is
  // left to the server, which answers 415 with the list when it cannot read the file.
  const TYPES = ["image/jpeg", "image/png", "image/webp", "image/bmp", "image/x-ms-bmp", "image/tiff",
    "image/gif", "image/heic", "image/heif", "image/avif", "image/jp2"];
  let file = null;
  let previewUrl = null;

  const drop = $("dropzone"), input = $("file"), form = $("form"), submit = $("submit"), status = $("status");

  function say(text, isError = false) {
    status.textContent = text;
    status.classList.toggle("error", isError);
  }

  function choose(f) {
    if (!f) return;
    if (f.type && !TYPES.includes(f.type)) {
      say(`${f.name}: not an image skAIn reads (JPEG, PNG, WebP, BMP, TIFF, GIF, HEIC)`, true);
      return;
    }
    file = f;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(f);
    const img = $("preview");
    img.src = previewUrl;
    img.hidden = false;
    drop.classList.add("has-image");
    $("file-name").textContent = `${f.name} · ${(f.size / 1024).toFixed(0)} KB`;
    submit.disabled = false;
    say("Ready: add the optional details, then press Analyse.");
  }

  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  input.addEventListener("change", () => choose(input.files[0]));
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault();
    drop.classList.add("drag");
  }));
  ["dragleave", "dragend"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("drag")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("drag");
    choose(e.dataTransfer && e.dataTransfer.files[0]);
  });
  // A file dropped next to the zone should not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  $("age").addEventListener("input", (e) => {
    const v = e.target.value;
    e.target.setAttribute("aria-invalid", String(v !== "" && !(Number(v) >= 0 && Number(v) <= 120)));
  });

  form.addEventListener("submit", (e) => { e.preventDefault(); analyse(false); });
  $("show-anyway").addEventListener("click", () => analyse(true));

  async function analyse(anyway) {
    if (!file) return;
    const data = new FormData();
    if (anyway) data.append("probabilities", "1");
    data.append("image", file, file.name);
    data.append("age", $("age").value);
    data.append("sex", $("sex").value);
    data.append("localization", $("site").value);
    data.append("heatmap", model.heatmaps ? "1" : "0");
    busy(true);
    try {
      const res = await fetch("api/predict", { method: "POST", body: data });
      const body = await res.json().catch(() => ({ error: `server answered ${res.status}` }));
      if (!res.ok) throw new Error(body.error || `server answered ${res.status}`);
      if (body.rejected) {
        renderRejected(body);
        say("No diagnosis: this does not look like a dermoscopic image.");
      } else {
        render(body);
        say(`Done: ${body.name} (${pct(body.probability)}).`);
      }
    } catch (err) {
      $("results").dataset.state = "error";
      say(err.message || String(err), true);
    } finally {
      busy(false);
    }
  }

  function renderRejected(r) {
    $("placeholder").hidden = true;
    $("result").hidden = true;
    $("rejected").hidden = false;
    $("rejected-message").textContent = r.message;
    $("results").dataset.state = "done";
  }

  function renderTriage(r) {
    const box = $("triage");
    box.hidden = !r.triage;
    if (box.hidden) return;
    const urgent = r.triage === "investigate further";
    box.classList.toggle("urgent", urgent);
    $("triage-label").textContent = urgent ? "Investigate further" : "Routine";
    const f = r.triage_figures;
    $("triage-detail").textContent = `P(malignant) ${pct(r.p_malignant)}` + (f ? ` · threshold ${pct(f.threshold)}; `
      + `on ${f.measured || "validation lesions"} it found ${pct(f.sensitivity)} of malignant lesions and called `
      + `${pct(f.specificity)} of benign ones routine` : "");
  }

  function busy(on) {
    submit.disabled = on || !file;
    submit.classList.toggle("busy", on);
    submit.querySelector(".btn-label").textContent = on ? "Analysing…" : "Analyse";
    if (on) { say("Analysing…"); $("results").dataset.state = "loading"; }
  }

  const pct = (p) => `${(100 * p).toFixed(1)}%`;

  function render(r) {
    const results = $("results");
    $("placeholder").hidden = true;
    $("rejected").hidden = true;
    $("result").hidden = false;
    renderTriage(r);
    $("top-name").textContent = r.name;
    $("top-code").textContent = r.diagnosis;
    $("top-tag").hidden = !r.malignant;
    const top = r.ranking[0];
    $("top-description").textContent = top.code === r.diagnosis ? r.description : `${r.description} Named by the ` +
      `balanced-accuracy decision rule, which weighs rare diagnoses up: the most probable class is ` +
      `${top.name} (${pct(top.probability)}).`;
    countUp(r.probability);
    renderBars(r.ranking, r.diagnosis);
    renderHeatmap(r.heatmap);
    renderExtras(r);
    if (window.matchMedia("(max-width: 820px)").matches) results.scrollIntoView({ behavior: "smooth" });
    const last = 70 * (r.ranking.length - 1) + 1150;
    setTimeout(() => { results.dataset.state = "done"; }, last);
  }

  function countUp(p) {
    const ring = $("ring"), label = $("top-prob"), start = performance.now(), target = 100 * p;
    ring.style.setProperty("--p", target.toFixed(1));
    const step = (t) => {
      const k = Math.min(1, (t - start) / 900);
      label.textContent = `${Math.round(target * (1 - Math.pow(1 - k, 3)))}%`;
      if (k < 1) requestAnimationFrame(step);
    };
    requestAnimationFrame(step);
  }

  function renderBars(ranking, chosen) {
    const list = $("bars");
    list.replaceChildren();
    ranking.forEach((c, i) => {
      const li = document.createElement("li");
      li.className = "bar" + (c.code === chosen ? " top-class" : "");
      li.dataset.class = c.code;
      li.dataset.probability = String(c.probability);
      li.style.animationDelay = `${i * 70}ms`;
      li.innerHTML = `<span class="label"><b></b><span class="full"></span></span>
        <span class="track" aria-hidden="true"><span class="fill"></span></span><span class="value"></span>`;
      li.querySelector("b").textContent = c.code;
      li.querySelector(".full").textContent = (names[c.code] || c).name;
      li.querySelector(".label").title = (names[c.code] || c).name;
      li.querySelector(".value").textContent = pct(c.probability);
      li.setAttribute("aria-label", `${(names[c.code] || c).name}: ${pct(c.probability)}`);
      const fill = li.querySelector(".fill");
      fill.style.transitionDelay = `${i * 70}ms`;
      list.append(li);
      requestAnimationFrame(() => requestAnimationFrame(() => {
        fill.style.width = `${Math.max(0.5, 100 * c.probability)}%`;
      }));
    });
  }

  function renderHeatmap(h) {
    const box = $("heat");
    box.hidden = !h || !!h.error;
    if (box.hidden) return;
    $("heat-image").src = h.image;
    $("heat-overlay").src = h.overlay;
    $("heat-target").textContent = (names[h.target] || { name: h.target }).name;
  }

  $("heat-toggle").addEventListener("click", (e) => {
    const on = e.currentTarget.getAttribute("aria-pressed") !== "true";
    e.currentTarget.setAttribute("aria-pressed", String(on));
    e.currentTarget.textContent = on ? "Heatmap on" : "Heatmap off";
    document.querySelector(".heat-figure").classList.toggle("off", !on);
  });

  function renderExtras(r) {
    const extra = Object.entries(r).filter(([k, v]) => !KNOWN.has(k) && v !== null && v !== undefined);
    const dl = $("extras-list");
    dl.replaceChildren();
    extra.forEach(([k, v]) => {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = k;
      dd.textContent = typeof v === "number" ? String(Math.round(v * 1000) / 1000)
        : typeof v === "object" ? JSON.stringify(v) : String(v);
      dl.append(dt, dd);
    });
    $("extras").hidden = extra.length === 0;
  }
})();
