// The page: draw on the canvas (or drop a photo) and see what the model answers, either
// from the server (`mnist-cnn serve`: POST api/predict) or computed in this browser with
// onnxruntime-web (a folder written by `mnist-cnn export --format web`, or `serve` with
// "in this browser" chosen). model.json says which are possible.
// Plain script; everything it loads comes from where the page came from.
"use strict";

(() => {
  const THROTTLE_MS = 150; // at most one prediction per this while the pen moves
  const DATASET_NAMES = { mnist: "MNIST", "fashion-mnist": "Fashion-MNIST" };
  // Once a static copy has its model, no request of any kind is allowed any more.
  const LOCKED_DOWN = "default-src 'none'; img-src data: blob:";

  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  // MNIST digits are about 2 px thick in a 28 px frame: 1/14 of the width.
  const PEN = canvas.width / 14;
  const { PrepareError } = window.MnistPrepare;

  let config = null; // model.json
  let classes = [];
  let barRows = [];
  let mode = "server"; // or "browser"
  let engine = null; // a promise of the in-browser session, once asked for
  let showLayers = false;
  let photo = null; // the photo being shown, if any (answered again when the mode changes)
  let hasInk = false;
  let drawing = false;
  let last = null;
  let timer = null;
  let inFlight = false;
  let dirty = false;
  let sent = 0; // numbers each request, so an old answer never replaces a newer one
  let shown = 0;

  function percent(p, digits = 1) {
    return `${(p * 100).toFixed(digits)}%`;
  }

  // --- the run, and where the model can run ------------------------------------------------

  async function loadConfig() {
    try {
      const res = await fetch("model.json", { cache: "no-cache" });
      if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
      config = await res.json();
    } catch (err) {
      const hint =
        location.protocol === "file:"
          ? " Open this folder through a web server, e.g. python -m http.server -d FOLDER."
          : "";
      $("run-info").textContent = `Could not load the model summary (${err.message}).${hint}`;
      return;
    }
    classes = config.classes;
    const dataset = String(config.dataset || "").split("/").pop();
    const parts = [DATASET_NAMES[dataset] || dataset, `recipe ${config.recipe}`];
    if (config.epochs) parts.push(`${config.epochs} epoch${config.epochs === 1 ? "" : "s"}`);
    if (config.test_accuracy != null) {
      parts.push(`test accuracy ${percent(config.test_accuracy, 2)}`);
    }
    $("run-info").textContent = `${config.run}: ${parts.join(" · ")}`;
    if (config.style === "fashion") {
      $("draw-title").textContent = "Draw a clothing item";
      document.body.classList.add("named-classes");
    }
    buildBars();

    const browser = config.browser;
    $("foot-server").hidden = !config.api;
    $("foot-static").hidden = Boolean(config.api);
    if (browser) {
      $("runtime-name").textContent = browser.runtime_version;
      $("layers-toggle").hidden = false;
    }
    if (config.api && browser) {
      $("mode").hidden = false;
      const wanted = new URLSearchParams(location.search).get("mode");
      if (wanted === "browser") setMode("browser");
    } else if (!config.api && browser) {
      setMode("browser");
    } else if (!config.api) {
      $("run-info").textContent += " · this copy has no model to run";
    }
    if (mode === "server" && config.api) answerAgain(); // drawn before the page knew its run
  }

  function setMode(next) {
    mode = next;
    for (const input of document.querySelectorAll("input[name=mode]")) {
      input.checked = input.value === next;
    }
    if (next === "browser") startEngine();
    answerAgain();
  }

  async function fetchBytes(path) {
    const res = await fetch(path);
    if (!res.ok) {
      const fallback = `${res.status} ${res.statusText}`;
      const why = await res.json().then((body) => body.error || fallback, () => fallback);
      throw new Error(`${path}: ${why}`);
    }
    return new Uint8Array(await res.arrayBuffer());
  }

  /** The model in this browser: onnxruntime-web's WebAssembly backend, one thread. */
  function startEngine() {
    if (engine) return engine;
    const b = config.browser;
    $("message").textContent = "Loading the model into this browser…";
    engine = (async () => {
      const runtimeUrl = new URL(b.runtime, document.baseURI).href;
      const [ort, wasm, model] = await Promise.all([
        import(runtimeUrl),
        fetchBytes(b.wasm),
        fetchBytes(b.model),
      ]);
      ort.env.wasm.numThreads = 1; // threads need a cross-origin-isolated page
      ort.env.wasm.proxy = false;
      ort.env.wasm.wasmBinary = wasm.buffer;
      ort.env.logLevel = "error";
      const session = await ort.InferenceSession.create(model, {
        executionProviders: ["wasm"],
      });
      if (!config.api) lockDown();
      performance.mark("mnist-cnn:ready");
      document.body.dataset.ready = "browser";
      if ($("message").textContent.startsWith("Loading")) $("message").textContent = "";
      return { ort, session };
    })();
    engine.catch((err) => showError(`The model could not run in this browser (${err.message}).`));
    return engine;
  }

  /** A static copy has all it needs: from now on, a second policy forbids every request. */
  function lockDown() {
    const meta = document.createElement("meta");
    meta.httpEquiv = "Content-Security-Policy";
    meta.content = LOCKED_DOWN;
    document.head.append(meta);
  }

  // --- answers: from the server or from the model in this browser ------------------------------

  /** The record `predict --json` prints, from probabilities computed here. */
  function recordOf(probs, name) {
    const top = Array.from(probs, (p, i) => ({
      class_index: i,
      class_name: classes[i],
      probability: Math.round(p * 1e6) / 1e6,
    })).sort((a, b) => b.probability - a.probability || a.class_index - b.class_index);
    return { input: name, ...top[0], top_k: top };
  }

  function seenUrl(pixels) {
    const small = document.createElement("canvas");
    small.width = small.height = 28;
    const g = small.getContext("2d");
    const img = g.createImageData(28, 28);
    pixels.forEach((v, i) => img.data.set([v, v, v, 255], i * 4));
    g.putImageData(img, 0, 0);
    return small.toDataURL("image/png");
  }

  async function runModel(pixels, withStages) {
    const { ort, session } = await engine;
    const b = config.browser;
    const x = new ort.Tensor("float32", Float32Array.from(pixels, (v) => v / 255), [1, 1, 28, 28]);
    const names = withStages ? [b.output, ...b.stages] : [b.output];
    const out = await session.run({ [b.input]: x }, names);
    return { probs: out[b.output].data, stages: withStages ? b.stages.map((s) => out[s]) : null };
  }

  /** The formats `predict` reads, told by their first bytes (as Pillow tells them). */
  function knownFormat(head) {
    const text = String.fromCharCode(...head);
    return (
      (head[0] === 0x89 && text.slice(1, 4) === "PNG") ||
      (head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff) ||
      text.startsWith("GIF8") ||
      text.startsWith("BM") ||
      (text.startsWith("RIFF") && text.slice(8, 12) === "WEBP")
    );
  }

  async function grayOfPhoto(file, name) {
    const c = config.preparation;
    const head = new Uint8Array(await file.slice(0, 12).arrayBuffer());
    if (!knownFormat(head)) {
      throw new PrepareError(`${name}: not an image file this reads (it reads ${c.formats})`);
    }
    const unreadable = () =>
      new PrepareError(`${name}: unreadable image (this browser could not decode it)`);
    // Its size from its header first: a huge picture is refused before it is decoded.
    const url = URL.createObjectURL(file);
    try {
      const probe = new Image();
      probe.src = url;
      await new Promise((resolve, reject) => {
        probe.onload = resolve;
        probe.onerror = () => reject(unreadable());
      });
      const pixels = probe.naturalWidth * probe.naturalHeight;
      if (pixels > c.max_pixels) {
        throw new PrepareError(
          `${name}: ${probe.naturalWidth}x${probe.naturalHeight} is over the ` +
            `${c.max_pixels.toLocaleString("en")}-pixel limit; downscale the image first`,
        );
      }
    } finally {
      URL.revokeObjectURL(url);
    }
    let bitmap;
    try {
      // As Pillow reads it: turned upright by its EXIF tag, colours as stored.
      bitmap = await createImageBitmap(file, {
        imageOrientation: "from-image",
        colorSpaceConversion: "none",
        premultiplyAlpha: "none",
      });
    } catch {
      throw unreadable();
    }
    const { width: w, height: h } = bitmap;
    const board = document.createElement("canvas");
    board.width = w;
    board.height = h;
    const g = board.getContext("2d", { willReadFrequently: true });
    g.fillStyle = "#fff"; // transparent areas are paper
    g.fillRect(0, 0, w, h);
    g.drawImage(bitmap, 0, 0);
    bitmap.close();
    return window.MnistPrepare.grayFromRGBA(g.getImageData(0, 0, w, h).data, w, h);
  }

  async function answerInBrowser(input, name) {
    const gray =
      input.kind === "photo"
        ? await grayOfPhoto(input.file, name)
        : window.MnistPrepare.grayFromRGBA(
            ctx.getImageData(0, 0, canvas.width, canvas.height).data,
            canvas.width,
            canvas.height,
          );
    const c = config.preparation;
    const pixels = window.MnistPrepare.prepare(gray, c.style, name, c);
    const { probs, stages } = await runModel(pixels, showLayers);
    return { ...recordOf(probs, name), seenSrc: seenUrl(pixels), pixels, stages };
  }

  /** The drawing as a PNG file, encoded now. (`canvas.toBlob` encodes in the page's idle
   *  time, and Chromium gave a busy page none for up to 6.7 s after a switch to the server.) */
  function canvasPng() {
    const base64 = canvas.toDataURL("image/png").split(",")[1];
    return new Blob([Uint8Array.from(atob(base64), (c) => c.charCodeAt(0))], { type: "image/png" });
  }

  async function answerFromServer(input, name) {
    const blob = input.kind === "photo" ? input.file : canvasPng();
    const form = new FormData();
    form.append("file", blob, name);
    let res;
    try {
      res = await fetch(`${config.api}?top_k=${Math.max(classes.length, 1)}`, {
        method: "POST",
        body: form,
      });
    } catch (err) {
      throw new Error(`the server did not answer (${err.message})`);
    }
    const record = await res.json().catch(() => ({ error: `${res.status} ${res.statusText}` }));
    if (record.error) throw new Error(record.error);
    record.seenSrc = `data:image/png;base64,${record.seen}`;
    if (showLayers && config.browser) {
      // The maps of the 28x28 the server saw, computed here.
      const pixels = await pixelsOfPng(record.seenSrc);
      startEngine();
      record.stages = (await runModel(pixels, true)).stages;
    }
    return record;
  }

  async function pixelsOfPng(src) {
    const base64 = src.slice(src.indexOf(",") + 1);
    const bytes = Uint8Array.from(atob(base64), (ch) => ch.charCodeAt(0));
    const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }), {
      colorSpaceConversion: "none",
    });
    const small = document.createElement("canvas");
    small.width = small.height = 28;
    const g = small.getContext("2d", { willReadFrequently: true });
    g.drawImage(bitmap, 0, 0);
    bitmap.close();
    const rgba = g.getImageData(0, 0, 28, 28).data;
    return Uint8Array.from({ length: 784 }, (_, i) => rgba[i * 4]);
  }

  async function predict(input, name, source) {
    if (!config) return;
    const id = ++sent;
    const started = performance.now();
    let record;
    try {
      record =
        mode === "browser" ? await answerInBrowser(input, name) : await answerFromServer(input, name);
    } catch (err) {
      record = { error: err instanceof PrepareError ? err.message : err.message || String(err) };
    }
    if (id <= shown) return; // a newer request has already been answered, or the page was cleared
    shown = id;
    if (record.error) {
      showError(record.error);
    } else {
      showAnswer(record, source);
      performance.measure("mnist-cnn:prediction", { start: started });
    }
  }

  function answerAgain() {
    if (photo) predict({ kind: "photo", file: photo }, photo.name || "photo", photo.name || "your photo");
    else if (hasInk) sendNow();
  }

  // --- showing an answer ---------------------------------------------------------------

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

  function showProbabilities(record) {
    const probs = classes.map(() => 0);
    if (record) for (const t of record.top_k) probs[t.class_index] = t.probability;
    barRows.forEach(({ row, fill, value }, i) => {
      fill.style.width = percent(probs[i]);
      value.textContent = record ? percent(probs[i]) : "";
      row.dataset.probability = record ? String(probs[i]) : "";
      row.classList.toggle("top", record != null && i === record.class_index);
    });
  }

  function showAnswer(record, source) {
    $("top-class").textContent = record.class_name;
    const named = record.class_name !== String(record.class_index);
    $("top-prob").textContent =
      `${percent(record.probability)} sure` + (named ? ` · class ${record.class_index}` : "");
    $("seen").src = record.seenSrc;
    $("seen").hidden = false;
    $("seen-empty").hidden = true;
    $("source").textContent = source;
    $("message").textContent = "";
    $("message").classList.remove("error");
    document.body.dataset.answeredBy = mode;
    showProbabilities(record);
    drawStages(record.stages);
    performance.mark("mnist-cnn:answer");
  }

  function showEmpty() {
    $("top-class").textContent = "–";
    $("top-prob").textContent = "Draw in the box to see the model's answer.";
    $("seen").hidden = true;
    $("seen").removeAttribute("src");
    $("seen-empty").hidden = false;
    $("source").textContent = "";
    $("message").textContent = "";
    $("message").classList.remove("error");
    showProbabilities(null);
    drawStages(null);
  }

  function showError(text) {
    $("message").textContent = text;
    $("message").classList.add("error");
  }

  // --- the layer view: each stage's feature maps as one grid of small images ------------------

  function drawStages(stages) {
    const box = $("stages");
    if (!showLayers || !stages) {
      box.replaceChildren();
      return;
    }
    const titles = config.browser.stage_titles;
    box.replaceChildren(
      ...stages.map((tensor, s) => {
        const [, channels, h, w] = tensor.dims;
        const data = tensor.data;
        let max = 0;
        for (const v of data) if (v > max) max = v;
        const cols = channels <= 16 ? 8 : 16;
        const rows = Math.ceil(channels / cols);
        const grid = document.createElement("canvas");
        grid.width = cols * (w + 1) - 1;
        grid.height = rows * (h + 1) - 1;
        grid.className = "stage-maps";
        const g = grid.getContext("2d");
        const img = g.createImageData(grid.width, grid.height);
        img.data.fill(255);
        for (let i = 0; i < img.data.length; i += 4) img.data.set([226, 229, 234], i);
        for (let c = 0; c < channels; c++) {
          const ox = (c % cols) * (w + 1);
          const oy = Math.floor(c / cols) * (h + 1);
          for (let y = 0; y < h; y++) {
            for (let x = 0; x < w; x++) {
              const v = max > 0 ? Math.round((255 * data[(c * h + y) * w + x]) / max) : 0;
              img.data.set([v, v, v], ((oy + y) * grid.width + ox + x) * 4);
            }
          }
        }
        g.putImageData(img, 0, 0);
        const figure = document.createElement("figure");
        figure.className = "stage";
        const caption = document.createElement("figcaption");
        caption.textContent = `${titles[s]} · ${channels} maps of ${w}×${h}`;
        figure.append(caption, grid);
        return figure;
      }),
    );
  }

  $("layers").addEventListener("change", (event) => {
    showLayers = event.target.checked;
    $("layers-card").hidden = !showLayers;
    if (showLayers) startEngine();
    answerAgain();
  });

  for (const input of document.querySelectorAll("input[name=mode]")) {
    input.addEventListener("change", () => setMode(input.value));
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
      await predict({ kind: "canvas" }, "canvas.png", "your drawing");
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
    photo = null;
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
    if (photo) clearCanvas();
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
      const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
      const scale = Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
      const w = bitmap.width * scale;
      const h = bitmap.height * scale;
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.drawImage(bitmap, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
      ctx.fillStyle = "#fff";
      bitmap.close();
    } catch {
      // not an image the browser can show; the answer says why it cannot be used either
    }
  }

  async function usePhoto(file) {
    if (!file) return;
    clearCanvas();
    photo = file;
    await preview(file);
    predict({ kind: "photo", file }, file.name || "photo", file.name || "your photo");
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
  loadConfig();
})();
