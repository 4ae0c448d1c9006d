// The page: draw on the canvas (or drop a photo), send it to /api/predict, show the answer.
// Plain script, no dependencies: everything it needs comes from this server.
"use strict";

(() => {
  const THROTTLE_MS = 150; // at most one prediction per this while the pen moves
  const DATASET_NAMES = { mnist: "MNIST", "fashion-mnist": "Fashion-MNIST" };

  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  // MNIST digits are about 2 px thick in a 28 px frame: 1/14 of the width.
  const PEN = canvas.width / 14;

  let classes = [];
  let barRows = [];
  let hasInk = false;
  let showingPhoto = false;
  let drawing = false;
  let last = null;
  let timer = null;
  let inFlight = false;
  let dirty = false;
  let sent = 0; // numbers each request, so an old answer never replaces a newer one
  let shown = 0;

  // --- the model's summary -------------------------------------------------------------

  function percent(p, digits = 1) {
    return `${(p * 100).toFixed(digits)}%`;
  }

  async function loadModel() {
    try {
      const res = await fetch("/api/model");
      if (!res.ok) throw new Error(res.statusText);
      const info = await res.json();
      classes = info.classes;
      const dataset = String(info.dataset || "").split("/").pop();
      const parts = [DATASET_NAMES[dataset] || dataset, `recipe ${info.recipe}`];
      if (info.epochs) parts.push(`${info.epochs} epoch${info.epochs === 1 ? "" : "s"}`);
      if (info.test_accuracy != null) parts.push(`test accuracy ${percent(info.test_accuracy, 2)}`);
      $("run-info").textContent = `${info.run}: ${parts.join(" · ")}`;
      if (info.style === "fashion") {
        $("draw-title").textContent = "Draw a clothing item";
        document.body.classList.add("named-classes");
      }
      buildBars();
    } catch (err) {
      $("run-info").textContent = `Could not load the model summary (${err.message}).`;
    }
  }

  function buildBars() {
    const list = $("bars");
    list.replaceChildren();
    barRows = classes.map((name) => {
      const row = document.createElement("li");
      const label = document.createElement("span");
      label.className = "bar-label";
      label.textContent = name;
      const track = document.createElement("span");
      track.className = "bar-track";
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      track.append(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      row.append(label, track, value);
      list.append(row);
      return { row, fill, value };
    });
    showProbabilities(null);
  }

  // --- showing an answer ---------------------------------------------------------------

  function showProbabilities(record) {
    const probs = classes.map(() => 0);
    if (record) for (const t of record.top_k) probs[t.class_index] = t.probability;
    barRows.forEach(({ row, fill, value }, i) => {
      fill.style.width = percent(probs[i]);
      value.textContent = record ? percent(probs[i]) : "";
      row.classList.toggle("top", record != null && i === record.class_index);
    });
  }

  function showAnswer(record, source) {
    $("top-class").textContent = record.class_name;
    const named = record.class_name !== String(record.class_index);
    $("top-prob").textContent =
      `${percent(record.probability)} sure` + (named ? ` · class ${record.class_index}` : "");
    $("seen").src = `data:image/png;base64,${record.seen}`;
    $("seen").hidden = false;
    $("seen-empty").hidden = true;
    $("source").textContent = source;
    $("message").textContent = "";
    $("message").classList.remove("error");
    showProbabilities(record);
  }

  function showEmpty() {
    $("top-class").textContent = "–";
    $("top-prob").textContent = "Draw in the box to see the model's answer.";
    $("seen").hidden = true;
    $("seen").removeAttribute("src");
    $("seen-empty").hidden = false;
    $("source").textContent = "";
    $("message").textContent = "";
    showProbabilities(null);
  }

  function showError(text) {
    $("message").textContent = text;
    $("message").classList.add("error");
  }

  async function predict(blob, name, source) {
    const id = ++sent;
    const form = new FormData();
    form.append("file", blob, name);
    let answer;
    try {
      const res = await fetch(`/api/predict?top_k=${Math.max(classes.length, 1)}`, {
        method: "POST",
        body: form,
      });
      answer = await res.json().catch(() => ({ error: `${res.status} ${res.statusText}` }));
    } catch (err) {
      answer = { error: `the server did not answer (${err.message})` };
    }
    if (id <= shown) return; // a newer request has already been answered, or the page was cleared
    shown = id;
    if (answer.error) showError(answer.error);
    else showAnswer(answer, source);
  }

  // --- sending the drawing: throttled while drawing, at once when a stroke ends ------------

  function schedule() {
    dirty = true;
    if (!timer) timer = setTimeout(flush, THROTTLE_MS);
  }

  function sendNow() {
    clearTimeout(timer);
    dirty = true;
    flush();
  }

  async function flush() {
    timer = null;
    if (inFlight || !dirty) return; // the request in flight sends again when it is answered
    dirty = false;
    if (!hasInk) return;
    inFlight = true;
    try {
      const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
      if (blob && hasInk) await predict(blob, "canvas.png", "your drawing");
    } finally {
      inFlight = false;
      if (dirty && !timer) timer = setTimeout(flush, 0);
    }
  }

  // --- drawing -----------------------------------------------------------------------------

  function clearCanvas() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = "#fff";
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = PEN;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    hasInk = false;
    showingPhoto = false;
    dirty = false;
    clearTimeout(timer);
    timer = null;
    shown = sent; // answers still on their way are for what was just wiped
    showEmpty();
  }

  function pointOf(event) {
    const box = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * canvas.width) / box.width,
      y: ((event.clientY - box.top) * canvas.height) / box.height,
    };
  }

  function dot(p) {
    ctx.beginPath();
    ctx.arc(p.x, p.y, PEN / 2, 0, 2 * Math.PI);
    ctx.fill();
  }

  function lineTo(p) {
    ctx.beginPath();
    ctx.moveTo(last.x, last.y);
    ctx.lineTo(p.x, p.y);
    ctx.stroke();
    last = p;
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (event.pointerType === "mouse" && event.button !== 0) return;
    event.preventDefault();
    if (showingPhoto) clearCanvas();
    drawing = true;
    canvas.setPointerCapture(event.pointerId);
    last = pointOf(event);
    dot(last);
    hasInk = true;
    schedule();
  });

  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const e of events.length ? events : [event]) lineTo(pointOf(e));
    schedule();
  });

  function endStroke() {
    if (!drawing) return;
    drawing = false;
    sendNow();
  }
  canvas.addEventListener("pointerup", endStroke);
  canvas.addEventListener("pointercancel", endStroke);
  canvas.addEventListener("lostpointercapture", endStroke);

  $("clear").addEventListener("click", clearCanvas);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") clearCanvas();
  });

  // --- photos: the file picker and drag and drop -------------------------------------------

  async function preview(file) {
    // The photo, fitted into the canvas, so the page shows what was sent.
    try {
      const bitmap = await createImageBitmap(file);
      const scale = Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
      const w = bitmap.width * scale;
      const h = bitmap.height * scale;
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.drawImage(bitmap, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
      ctx.fillStyle = "#fff";
      bitmap.close();
    } catch {
      // not an image the browser can show; the server says why it cannot use it either
    }
  }

  async function usePhoto(file) {
    if (!file) return;
    clearCanvas();
    showingPhoto = true;
    await preview(file);
    predict(file, file.name || "photo", file.name || "your photo");
  }

  $("file").addEventListener("change", (event) => {
    usePhoto(event.target.files[0]);
    event.target.value = ""; // choosing the same file again still triggers a prediction
  });

  const zone = $("drop-zone");
  window.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  window.addEventListener("dragleave", (event) => {
    if (event.relatedTarget == null) zone.classList.remove("dragging");
  });
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    usePhoto(event.dataTransfer && event.dataTransfer.files[0]);
  });

  clearCanvas();
  loadModel();
})();
