// parallel_nn's live page: the runs, their curves as they train, the speed and the timeline of a
// few steps, what the first layer learned, and a pad to draw a digit on. Plain JavaScript, no
// library and nothing fetched from outside the server: every chart is drawn by hand on a <canvas>.
//
// The server's API (all JSON; an error is {"error": "one line"}):
//   GET  /api/runs                            the runs, newest first
//   GET  /api/runs/RUN/metrics                one object per epoch
//   GET  /api/runs/RUN/steps?since=N          {"steps": [...], "next": N', "more": bool, "origin": id}
//   GET  /api/runs/RUN/events?since=N         server-sent events: step, epoch, state, reset
//   GET  /api/runs/RUN/filters                the first layer's weights as 28x28 grey images
//   GET  /api/runs/RUN/misclassified?limit=K  test digits it gets wrong
//   GET  /api/runs/RUN/trace?steps=K          a few traced steps, per process
//   POST /api/runs/RUN/predict                {"pixels": [784]} -> {"digit", "probabilities"}
"use strict";

(function () {

// ---- small helpers ---------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// A run's name in a URL. encodeURIComponent throws on a lone surrogate: such a name becomes one
// the server will answer 404 for, not an exception.
function encodeName(name) {
  try {
    return encodeURIComponent(name);
  } catch (_) {
    return encodeURIComponent(String(name).replace(/[\uD800-\uDFFF]/g, "\uFFFD"));
  }
}

function api(run, what) {
  return "/api/runs/" + encodeName(run) + (what ? "/" + what : "");
}

// The run named in the address's #run=NAME, or "" (a malformed one is no name, not an error).
function hashRun() {
  const match = location.hash.match(/run=([^&]+)/);
  if (!match) return "";
  try {
    return decodeURIComponent(match[1]);
  } catch (_) {
    return "";
  }
}

// fetch + JSON; a non-2xx answer throws an Error carrying the server's one-line message.
async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error : response.status + " " + response.statusText;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

function percent(x, digits) {
  return x === null || x === undefined ? "–" : (100 * x).toFixed(digits === undefined ? 2 : digits) + "%";
}

function setStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", !!isError);
}

const RUN_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#e6850e", "#17becf", "#8c564b", "#e377c2",
                     "#7f7f7f", "#bcbd22"];
const runColours = new Map();   // a run keeps its colour for the life of the page
function colourOf(name) {
  if (!runColours.has(name)) runColours.set(name, RUN_COLOURS[runColours.size % RUN_COLOURS.length]);
  return runColours.get(name);
}

// ---- state ---------------------------------------------------------------------------------

const state = {
  runs: [],              // the last answer of /api/runs
  selected: null,        // the run shown in full (name)
  overlay: new Set(),    // runs whose curves are overlaid (names)
  data: new Map(),       // name -> RunData, for the runs shown
  gone: new Set(),       // runs that were shown and whose directory has gone since
  trace: null,           // {run, trace} of the selected run, or {run, missing: true}
  learnedFor: null,      // "run@epoch" whose filters and misclassified digits are on the page
};

function runInfo(name) {
  return state.runs.find((r) => r.name === name) || null;
}

function shownRuns() {
  const names = [];
  if (state.selected) names.push(state.selected);
  for (const name of state.overlay) if (name !== state.selected && runInfo(name)) names.push(name);
  return names;
}

const isLive = (info) => !!info && (info.state === "running" || info.state === "new");

// What the page holds for one run it shows: its steps and epochs, and how it follows them.
class RunData {
  constructor(name) {
    this.name = name;
    this.steps = [];
    this.metrics = [];
    this.next = 0;            // the first step index not yet seen
    this.origin = null;       // which progress file the steps come from (the server's "origin")
    this.source = null;       // the EventSource while live
    this.pollTimer = null;    // the polling fallback
    this.loaded = false;
    this.ended = false;       // followed until the run stopped (a new trainer in it starts over)
    this.closed = false;
  }

  async load() {
    const [, metrics] = await Promise.all([this.fetchSteps(), getJSON(api(this.name, "metrics"))]);
    if (this.closed) return;
    this.metrics = metrics;
    this.loaded = true;
  }

  // The steps from this.next on, page by page (an answer holds at most 5,000); a progress file
  // that was replaced meanwhile (the directory used for another run) starts the steps over.
  async fetchSteps() {
    for (let page = 0; page < 10000 && !this.closed; page++) {
      const answer = await getJSON(api(this.name, "steps?since=" + this.next));
      if (this.closed) return;
      if (answer.origin !== null && this.origin !== null && answer.origin !== this.origin) {
        this.reset();
        this.origin = answer.origin;
        continue;
      }
      if (answer.origin !== null) this.origin = answer.origin;
      this.addSteps(answer.steps);
      this.next = Math.max(this.next, answer.next);
      if (!answer.more || !answer.steps.length) return;
    }
  }

  // The run's files started over (its directory reused, or a resume cut them back): drop what we have.
  reset() {
    this.steps = [];
    this.metrics = [];
    this.next = 0;
    this.origin = null;
    scheduleDraw();
  }

  addSteps(steps) {
    for (const step of steps) {
      if (step.i < this.next) continue;   // seen already (an event and a poll can overlap)
      this.steps.push(step);
      this.next = step.i + 1;
    }
  }

  addEpoch(metrics) {
    this.metrics = this.metrics.filter((m) => m.epoch !== metrics.epoch).concat([metrics]);
    this.metrics.sort((a, b) => a.epoch - b.epoch);
  }

  // Follow the run as it trains: server-sent events, or polling /steps every second if they fail.
  follow() {
    if (this.closed || this.source || this.pollTimer) return;
    if (!("EventSource" in window)) {
      this.poll();
      return;
    }
    const source = new EventSource(api(this.name, "events?since=" + this.next));
    this.source = source;
    source.addEventListener("step", (event) => {
      this.addSteps([JSON.parse(event.data)]);
      scheduleDraw();
    });
    source.addEventListener("epoch", (event) => {
      this.addEpoch(JSON.parse(event.data));
      scheduleDraw();
      refreshRuns();   // the run's epoch count and accuracy changed; so may its weights
    });
    source.addEventListener("reset", () => {
      this.reset();
      refreshRuns();
    });
    source.addEventListener("state", (event) => {
      const info = runInfo(this.name), now = JSON.parse(event.data).state;
      if (info) info.state = now;
      if (now === "gone") {
        this.close();
        state.gone.add(this.name);
      } else if (!isLive(info)) {
        this.stop();
      }
      refreshRuns();
    });
    source.onerror = () => {
      // The stream broke (the server went away, a proxy cut it): poll instead, once a second.
      this.closeSource();
      if (!this.closed && isLive(runInfo(this.name))) this.poll();
    };
  }

  poll() {
    const tick = async () => {
      this.pollTimer = null;
      if (this.closed) return;
      try {
        await this.fetchSteps();
        scheduleDraw();
      } catch (error) {
        setStatus("following " + this.name + ": " + error.message, true);
      }
      if (!this.closed && isLive(runInfo(this.name))) this.pollTimer = setTimeout(tick, 1000);
    };
    this.pollTimer = setTimeout(tick, 1000);
  }

  closeSource() {
    if (this.source) {
      this.source.close();
      this.source = null;
    }
  }

  // The run is no longer live: stop following, and fetch what the stream may not have carried.
  stop() {
    this.closeSource();
    clearTimeout(this.pollTimer);
    this.pollTimer = null;
    this.ended = true;
    Promise.all([this.fetchSteps(), getJSON(api(this.name, "metrics"))])
      .then(([, metrics]) => {
        if (this.closed) return;
        this.metrics = metrics;
        scheduleDraw();
      })
      .catch(() => {});
  }

  close() {
    this.closed = true;
    this.closeSource();
    clearTimeout(this.pollTimer);
    this.pollTimer = null;
  }
}

// ---- the runs --------------------------------------------------------------------------------

let refreshing = null;
async function refreshRuns() {
  if (refreshing) return refreshing;   // one request at a time
  refreshing = (async () => {
    try {
      const before = shownRuns();
      state.runs = await getJSON("/api/runs");
      for (const name of before) if (!runInfo(name)) state.gone.add(name);   // deleted while shown
      for (const run of state.runs) state.gone.delete(run.name);
      const live = state.runs.filter((r) => r.state === "running").length;
      setStatus(state.runs.length + (state.runs.length === 1 ? " run" : " runs") + (live ? ", " + live + " training" : "")
                + (state.gone.size ? "; gone: " + [...state.gone].join(", ") : ""));
    } catch (error) {
      setStatus("cannot list the runs: " + error.message + " (retrying)", true);
      return;
    } finally {
      refreshing = null;
    }
    if (!state.selected || !runInfo(state.selected)) state.selected = defaultRun();
    for (const name of [...state.overlay]) if (!runInfo(name)) state.overlay.delete(name);
    renderRuns();
    syncShown();
  })();
  return refreshing;
}

function defaultRun() {
  const wanted = hashRun();
  if (wanted && runInfo(wanted)) return wanted;
  const running = state.runs.find((r) => r.state === "running");
  return running ? running.name : state.runs.length ? state.runs[0].name : null;
}

let shownSignature = null;
function renderRuns() {
  // Rebuilt only when what it shows changed: a row replaced under the pointer would eat a click.
  const signature = JSON.stringify([state.selected, [...state.overlay],
    state.runs.map((r) => [r.name, r.state, r.python, r.backend, r.workers, r.epoch, r.epochs, r.test_accuracy])]);
  if (signature === shownSignature) return;
  shownSignature = signature;
  const body = document.querySelector("#runs tbody");
  $("no-runs").hidden = state.runs.length > 0;
  // Rebuilding the rows would take the keyboard focus away: remember which control had it.
  const focused = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset : {};
  const focusKey = focused.run ? focused.kind + "|" + focused.run : null;
  body.replaceChildren();
  state.runs.forEach((run, index) => {
    const id = "run-" + index;
    const show = el("input", {type: "radio", name: "run", id: id, "data-run": run.name, "data-kind": "show",
                              "aria-label": "show run " + run.name});
    show.checked = run.name === state.selected;
    show.addEventListener("change", () => select(run.name));
    const overlay = el("input", {type: "checkbox", "data-run": run.name, "data-kind": "overlay",
                                 "aria-label": "overlay the curves of run " + run.name});
    overlay.checked = state.overlay.has(run.name) || run.name === state.selected;
    overlay.disabled = run.name === state.selected;
    overlay.addEventListener("change", () => {
      if (overlay.checked) state.overlay.add(run.name);
      else state.overlay.delete(run.name);
      renderRuns();   // its colour swatch
      syncShown();
    });
    const shown = run.name === state.selected || state.overlay.has(run.name);
    const swatch = el("span", {class: "swatch", "aria-hidden": "true"});
    swatch.style.background = shown ? colourOf(run.name) : "transparent";
    const row = el("tr", {class: run.name === state.selected ? "selected" : ""},
      el("td", {}, show),
      el("td", {}, overlay),
      el("td", {class: "name"}, swatch, el("label", {for: id, text: run.name})),
      el("td", {}, el("span", {class: "state " + run.state, text: run.state})),
      el("td", {text: run.python || "–"}),
      el("td", {text: run.backend || "–"}),
      el("td", {class: "num", text: run.workers === null || run.workers === undefined ? "–" : String(run.workers)}),
      el("td", {class: "num", text: (run.epoch || 0) + " / " + (run.epochs || "?")}),
      el("td", {class: "num", text: percent(run.test_accuracy)}));
    body.append(row);
  });
  if (focusKey) {
    const again = [...body.querySelectorAll("input")].find((i) => i.dataset.kind + "|" + i.dataset.run === focusKey);
    if (again) again.focus();
  }
}

function select(name) {
  if (state.selected === name) return;
  state.selected = name;
  history.replaceState(null, "", "#run=" + encodeName(name));
  renderRuns();
  syncShown();
  predictSoon();
}

// Load the runs now shown, follow the live ones, drop the others; then the selected run's extras.
function syncShown() {
  const names = shownRuns();
  for (const [name, data] of state.data) {
    if (!names.includes(name)) {
      data.close();
      state.data.delete(name);
    }
  }
  for (const name of names) {
    let data = state.data.get(name);
    const info = runInfo(name);
    if (data && data.ended && isLive(info)) {
      // Live again after it ended: a trainer in the same directory (--overwrite, --resume), whose
      // steps may be fewer than those shown. Load it afresh.
      data.close();
      data = null;
    }
    if (!data) {
      data = new RunData(name);
      state.data.set(name, data);
      data.load()
        .then(() => {
          if (isLive(runInfo(name))) data.follow();
          else data.ended = true;
          scheduleDraw();
        })
        .catch((error) => setStatus("run " + name + ": " + error.message, true));
      continue;
    }
    if (!data.loaded) continue;
    if (isLive(info)) {
      data.follow();
    } else if (data.source || data.pollTimer) {
      data.stop();
    }
    if (info && info.epoch > data.metrics.length && !data.source) {
      getJSON(api(name, "metrics")).then((m) => { data.metrics = m; scheduleDraw(); }).catch(() => {});
    }
  }
  $("run-title").textContent = names.length ? names.join(" · ") : "";
  loadTrace();
  loadLearned();
  scheduleDraw();
}

// ---- line charts, drawn by hand ----------------------------------------------------------------

// Size the canvas's pixels to its size on screen (times the device pixel ratio): sharp lines.
function prepare(canvas, cssHeight) {
  if (!canvas.dataset.aspect) canvas.dataset.aspect = String(canvas.height / canvas.width);
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(240, canvas.clientWidth || canvas.width);
  const height = cssHeight || Math.round(width * Number(canvas.dataset.aspect));
  if (cssHeight) canvas.style.height = height + "px";
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "12px system-ui, sans-serif";
  return {ctx, width, height};
}

// About `count` round tick values between lo and hi (steps of 1, 2 or 5 times a power of ten).
function ticks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / Math.max(1, count);
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || 10 * power;
  const values = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) values.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  return values;
}

function formatTick(value, step) {
  const decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9)));
  return value.toFixed(decimals);
}

function emptyChart(canvas, message, cssHeight) {
  const {ctx, width, height} = prepare(canvas, cssHeight);
  ctx.fillStyle = "#4a4a50";
  ctx.textAlign = "center";
  ctx.fillText(message, width / 2, height / 2);
}

// series: [{points: [[x, y], ...], colour, width, alpha, dash, dots}]
// options: {xLabel, yLabel, yMin, yMax, percent (y is a fraction shown as %), empty}
function lineChart(canvas, series, options) {
  const all = [];
  for (const s of series) for (const p of s.points) if (Number.isFinite(p[0]) && Number.isFinite(p[1])) all.push(p);
  if (!all.length) {
    emptyChart(canvas, options.empty || "nothing yet");
    return;
  }
  const {ctx, width, height} = prepare(canvas);
  const margin = {left: 58, right: 14, top: 10, bottom: 40};
  const plotW = width - margin.left - margin.right, plotH = height - margin.top - margin.bottom;

  // (Loops, not Math.min(...points): a long run has more points than a call takes arguments.)
  let xLo = Infinity, xHi = -Infinity, yLo = Infinity, yHi = -Infinity;
  for (const [x, y] of all) {
    if (x < xLo) xLo = x;
    if (x > xHi) xHi = x;
    if (y < yLo) yLo = y;
    if (y > yHi) yHi = y;
  }
  if (options.xMin !== undefined) xLo = Math.min(xLo, options.xMin);
  if (xHi <= xLo) xHi = xLo + 1;
  const pad = (yHi - yLo) * 0.05 || Math.abs(yHi) * 0.05 || 0.05;
  yLo -= pad;
  yHi += pad;
  if (options.yMin !== undefined) yLo = Math.max(yLo, options.yMin);
  if (options.yMax !== undefined) yHi = Math.min(yHi, options.yMax);
  if (options.yFloor !== undefined) yLo = options.yFloor;
  if (yHi <= yLo) yHi = yLo + 1e-6;

  const X = (x) => margin.left + (x - xLo) / (xHi - xLo) * plotW;
  const Y = (y) => margin.top + (1 - (y - yLo) / (yHi - yLo)) * plotH;

  // Grid, tick labels, axis labels.
  ctx.strokeStyle = "#e6e6e2";
  ctx.fillStyle = "#3a3a40";
  ctx.lineWidth = 1;
  const yScale = options.percent ? 100 : 1;
  const yTicks = ticks(yLo * yScale, yHi * yScale, 5);
  const yStep = yTicks.length > 1 ? yTicks[1] - yTicks[0] : 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const t of yTicks) {
    const y = Math.round(Y(t / yScale)) + 0.5;
    ctx.beginPath(); ctx.moveTo(margin.left, y); ctx.lineTo(margin.left + plotW, y); ctx.stroke();
    ctx.fillText(formatTick(t, yStep) + (options.percent ? "%" : ""), margin.left - 6, y);
  }
  let xTicks = ticks(xLo, xHi, Math.max(2, Math.floor(plotW / 70)));
  if (options.integerX) xTicks = xTicks.filter((t) => Math.abs(t - Math.round(t)) < 1e-9);
  const xStep = options.integerX ? 1 : xTicks.length > 1 ? xTicks[1] - xTicks[0] : 1;
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const t of xTicks) {
    const x = Math.round(X(t)) + 0.5;
    ctx.beginPath(); ctx.moveTo(x, margin.top); ctx.lineTo(x, margin.top + plotH); ctx.stroke();
    ctx.fillText(formatTick(t, xStep), x, margin.top + plotH + 5);
  }
  ctx.strokeStyle = "#6a6a70";
  ctx.beginPath();
  ctx.moveTo(margin.left + 0.5, margin.top); ctx.lineTo(margin.left + 0.5, margin.top + plotH + 0.5);
  ctx.lineTo(margin.left + plotW, margin.top + plotH + 0.5);
  ctx.stroke();
  ctx.fillStyle = "#1d1d1f";
  ctx.fillText(options.xLabel || "", margin.left + plotW / 2, height - 16);
  ctx.save();
  ctx.translate(13, margin.top + plotH / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textBaseline = "middle";
  ctx.fillText(options.yLabel || "", 0, 0);
  ctx.restore();

  // The series, clipped to the plot.
  ctx.save();
  ctx.beginPath();
  ctx.rect(margin.left, margin.top, plotW, plotH);
  ctx.clip();
  ctx.lineJoin = "round";
  for (const s of series) {
    const points = s.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
    if (!points.length) continue;
    ctx.globalAlpha = s.alpha === undefined ? 1 : s.alpha;
    ctx.strokeStyle = ctx.fillStyle = s.colour;
    ctx.lineWidth = s.width || 1.5;
    ctx.setLineDash(s.dash || []);
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
    ctx.stroke();
    if (s.dots || points.length === 1) {
      for (const p of points) {
        ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 3, 0, 2 * Math.PI); ctx.fill();
      }
    }
  }
  ctx.restore();
}

// Exponential moving average with the start-up bias removed (as TensorBoard smooths).
function smooth(values, weight) {
  let average = 0, debias = 0;
  return values.map((v) => {
    average = weight * average + (1 - weight) * v;
    debias = weight * debias + (1 - weight);
    return average / debias;
  });
}

// A step's place on the x axis, in epochs: curves of runs with different batch sizes line up.
const stepX = (s) => s.epoch - 1 + s.step / s.steps;

function stepSeries(key) {
  const series = [];
  let raw = 0;
  for (const name of shownRuns()) {
    const data = state.data.get(name);
    if (!data || !data.steps.length) continue;
    const steps = data.steps.filter((s) => Number.isFinite(s[key]));
    const xs = steps.map(stepX), ys = steps.map((s) => s[key]);
    // Smooth over about a twentieth of an epoch (a longer average lags the raw curve visibly).
    const weight = Math.min(0.98, Math.max(0.5, 1 - 20 / Math.max(1, steps.length ? steps[0].steps : 1)));
    const smoothed = smooth(ys, weight);
    series.push({points: xs.map((x, i) => [x, ys[i]]), colour: colourOf(name), width: 1, alpha: 0.25});
    series.push({points: xs.map((x, i) => [x, smoothed[i]]), colour: colourOf(name), width: 2});
    raw += steps.length;
  }
  return {series, raw};
}

function epochSeries(key) {
  const series = [];
  let count = 0;
  for (const name of shownRuns()) {
    const data = state.data.get(name);
    if (!data || !data.metrics.length) continue;
    const points = (k) => data.metrics.map((m) => [m.epoch, m[k]]);
    series.push({points: points("train_" + key), colour: colourOf(name), dash: [6, 4], dots: true});
    series.push({points: points("test_" + key), colour: colourOf(name), width: 2, dots: true});
    count += data.metrics.length;
  }
  return {series, count};
}

let drawTimer = null;
function scheduleDraw() {
  if (drawTimer === null) drawTimer = setTimeout(() => { drawTimer = null; drawCurves(); }, 50);
}

function drawCurves() {
  const none = state.runs.length ? "no steps yet" : "no runs yet";
  const loss = stepSeries("loss");
  lineChart($("step-loss"), loss.series, {xLabel: "epoch", xMin: 0, yLabel: "loss", yFloor: 0, empty: none});
  $("step-loss").dataset.points = String(loss.raw);
  const accuracy = stepSeries("accuracy");
  lineChart($("step-accuracy"), accuracy.series, {xLabel: "epoch", xMin: 0, yLabel: "accuracy", percent: true, yMin: 0, yMax: 1, empty: none});
  $("step-accuracy").dataset.points = String(accuracy.raw);
  const epochs = state.runs.length ? "no finished epoch yet" : "no runs yet";
  const eLoss = epochSeries("loss");
  lineChart($("epoch-loss"), eLoss.series, {xLabel: "epoch", yLabel: "loss", yMin: 0, integerX: true, empty: epochs});
  $("epoch-loss").dataset.points = String(eLoss.count);
  const eAccuracy = epochSeries("accuracy");
  lineChart($("epoch-accuracy"), eAccuracy.series, {xLabel: "epoch", yLabel: "accuracy", percent: true, yMin: 0, yMax: 1, integerX: true, empty: epochs});
  $("epoch-accuracy").dataset.points = String(eAccuracy.count);
  const speed = stepSeries("examples_per_second");
  lineChart($("throughput"), speed.series, {xLabel: "epoch", xMin: 0, yLabel: "examples / s", yFloor: 0, empty: none});
  $("throughput").dataset.points = String(speed.raw);

  const legend = $("curves-legend");
  legend.replaceChildren(...shownRuns().map((name) => {
    const info = runInfo(name) || {};
    const swatch = el("span", {class: "swatch", "aria-hidden": "true"});
    swatch.style.background = colourOf(name);
    return el("li", {}, swatch, name + " (" + [info.python, info.backend, info.workers === undefined || info.workers === null ? "" : info.workers + (info.workers === 1 ? " worker" : " workers")].filter(Boolean).join(", ") + ")");
  }));
  drawTimeline();
}

// ---- the timeline of a few traced steps (a Gantt chart, as a profiler shows) --------------------

// The colours of docs/timeline.png (parallel_nn/web/plot.py), so the page and the pictures agree.
const PHASE_COLOURS = {
  "dispatch": "#f58518", "write slot": "#f58518", "serialise": "#f58518",
  "wait": "#d0d0d0", "barrier": "#a0a0a0",
  "read weights": "#9ecae9", "decode": "#72b7b2", "forward": "#4c78a8", "backward": "#2f4b7c", "evaluate": "#b279a2",
  "reduce": "#e45756", "reduce slice": "#e45756",
  "update": "#54a24b", "update slice": "#54a24b", "checkpoint": "#eeca3b", "pack lanes": "#88d27a",
  "step": "#f2e6c9",
};
const OTHER_COLOURS = ["#ff9da6", "#9d755d", "#bab0ac", "#d67195", "#fcbf5d"];
function phaseColour(name) {
  if (PHASE_COLOURS[name]) return PHASE_COLOURS[name];
  let hash = 0;
  for (const c of name) hash = (hash * 31 + c.charCodeAt(0)) >>> 0;
  return OTHER_COLOURS[hash % OTHER_COLOURS.length];
}

let traceRequest = null;
function loadTrace() {
  const name = state.selected;
  const info = runInfo(name);
  if (!name || !info || !info.has_trace) {
    state.trace = name ? {run: name, missing: true} : null;
    return;
  }
  if (state.trace && state.trace.run === name && !state.trace.missing) return;
  if (traceRequest === name) return;
  traceRequest = name;
  getJSON(api(name, "trace?steps=4"))
    .then((trace) => { if (state.selected === name) state.trace = {run: name, trace}; })
    .catch((error) => { if (state.selected === name) state.trace = {run: name, missing: true, error: error.message}; })
    .finally(() => { traceRequest = null; scheduleDraw(); });
}

let timelineBoxes = [];   // [x, y, w, h, process, span] of what is drawn, for the hover line
function drawTimeline() {
  const canvas = $("timeline"), legend = $("timeline-legend");
  timelineBoxes = [];
  const t = state.trace;
  if (!t || t.missing || !t.trace || !t.trace.spans.length) {
    const message = !state.selected ? "no run chosen"
      : t && t.error ? "no timeline: " + t.error
      : t && t.trace ? "the trace holds no steps"
      : t && t.missing ? "this run has no trace (train it with --trace FILE.json)" : "loading…";
    emptyChart(canvas, message, 60);
    legend.replaceChildren();
    canvas.dataset.spans = "0";
    return;
  }
  const trace = t.trace;
  const processes = trace.processes.slice();
  for (const span of trace.spans) if (!processes.includes(span.process)) processes.push(span.process);
  const rowH = 26, top = 8, bottom = 36, left = 92, right = 12;
  const {ctx, width, height} = prepare(canvas, top + processes.length * rowH + bottom);
  const t0 = Math.min(...trace.spans.map((s) => s.start_ms));
  const t1 = Math.max(...trace.spans.map((s) => s.start_ms + s.duration_ms));
  const plotW = width - left - right;
  const X = (ms) => left + (ms - t0) / Math.max(1e-9, t1 - t0) * plotW;

  // Time axis.
  const xTicks = ticks(0, t1 - t0, Math.max(2, Math.floor(plotW / 80)));
  const xStep = xTicks.length > 1 ? xTicks[1] - xTicks[0] : 1;
  ctx.strokeStyle = "#e6e6e2";
  ctx.fillStyle = "#3a3a40";
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const axisY = top + processes.length * rowH;
  for (const tick of xTicks) {
    const x = Math.round(X(t0 + tick)) + 0.5;
    ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, axisY); ctx.stroke();
    ctx.fillText(formatTick(tick, xStep), x, axisY + 4);
  }
  ctx.fillStyle = "#1d1d1f";
  ctx.fillText("milliseconds", left + plotW / 2, height - 15);

  // One row per process; a span inside another (a parent's phases inside its "step") is drawn
  // inset, over the enclosing one.
  const used = new Set();
  processes.forEach((process, row) => {
    const y = top + row * rowH;
    ctx.fillStyle = "#1d1d1f";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    ctx.fillText(process, left - 8, y + rowH / 2);
    const spans = trace.spans.filter((s) => s.process === process)
      .sort((a, b) => a.start_ms - b.start_ms || b.duration_ms - a.duration_ms);
    const open = [];   // end times of the spans enclosing the current one
    for (const span of spans) {
      while (open.length && open[open.length - 1] <= span.start_ms + 1e-9) open.pop();
      const depth = Math.min(open.length, 2);
      open.push(span.start_ms + span.duration_ms);
      const inset = depth === 0 ? 2 : 2 + depth * 4;
      const x = X(span.start_ms), w = Math.max(1, X(span.start_ms + span.duration_ms) - x);
      const box = [x, y + inset, w, rowH - 2 * inset];
      ctx.fillStyle = phaseColour(span.name);
      ctx.fillRect(...box);
      if (w > 3) {
        ctx.strokeStyle = "rgba(255, 255, 255, 0.8)";
        ctx.lineWidth = 0.5;
        ctx.strokeRect(...box);
      }
      used.add(span.name);
      timelineBoxes.push([...box, process, span, depth]);
    }
  });
  canvas.dataset.spans = String(trace.spans.length);

  legend.replaceChildren(...[...used].map((name) => {
    const swatch = el("span", {class: "swatch", "aria-hidden": "true"});
    swatch.style.background = phaseColour(name);
    return el("li", {}, swatch, name);
  }));
}

function hoverTimeline(event) {
  const canvas = $("timeline");
  const rect = canvas.getBoundingClientRect();
  const x = event.clientX - rect.left, y = event.clientY - rect.top;
  let best = null;
  for (const box of timelineBoxes) {
    if (x >= box[0] && x <= box[0] + box[2] && y >= box[1] && y <= box[1] + box[3]) {
      if (!best || box[6] >= best[6]) best = box;   // the innermost span under the pointer
    }
  }
  $("timeline-hover").textContent = best
    ? best[4] + ": " + best[5].name + ", " + best[5].duration_ms.toFixed(2) + " ms" : "";
}

// ---- what the network learned --------------------------------------------------------------

// Grey digits as MNIST stores them: the value is the ink (white ink on black).
function drawDigit(canvas, pixels) {
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(28, 28);
  for (let i = 0; i < 784; i++) {
    const v = pixels[i];
    image.data.set([v, v, v, 255], 4 * i);
  }
  ctx.putImageData(image, 0, 0);
}

// A weight image, 128 = zero: blue below, white at zero, red above (a diverging map).
function drawFilter(canvas, pixels) {
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(28, 28);
  const neg = [33, 102, 172], pos = [178, 24, 43];
  for (let i = 0; i < 784; i++) {
    const t = Math.max(-1, Math.min(1, (pixels[i] - 128) / 127));
    const end = t < 0 ? neg : pos, a = Math.abs(t);
    image.data.set([255 + (end[0] - 255) * a, 255 + (end[1] - 255) * a, 255 + (end[2] - 255) * a, 255], 4 * i);
  }
  ctx.putImageData(image, 0, 0);
}

function loadLearned() {
  const name = state.selected, info = runInfo(name);
  const filters = $("filters"), wrong = $("misclassified"), summary = $("misclassified-summary");
  if (!name || !info) {
    filters.replaceChildren(el("p", {class: "hint", text: "no run chosen"}));
    wrong.replaceChildren();
    summary.textContent = "";
    state.learnedFor = null;
    return;
  }
  const key = name + "@" + info.epoch;
  if (state.learnedFor === key) return;
  state.learnedFor = key;
  if (!info.epoch) {
    // Weights are written after each epoch: none to show before the first.
    filters.replaceChildren(el("p", {class: "hint", text: "no weights yet: they appear after the first epoch"}));
    wrong.replaceChildren();
    summary.textContent = "";
    return;
  }
  getJSON(api(name, "filters"))
    .then((answer) => {
      if (state.learnedFor !== key) return;
      filters.replaceChildren(...answer.filters.map((pixels, unit) => {
        const canvas = el("canvas", {width: 28, height: 28, role: "img", "aria-label": "weights of hidden unit " + unit});
        drawFilter(canvas, pixels);
        return el("figure", {title: "hidden unit " + unit}, canvas);
      }));
    })
    .catch((error) => {
      if (state.learnedFor === key) filters.replaceChildren(el("p", {class: "hint", text: "no filters: " + error.message}));
    });
  getJSON(api(name, "misclassified?limit=36"))
    .then((answer) => {
      if (state.learnedFor !== key) return;
      if (answer.missing) {  // no test set where serve looked: say so, and how to fix it
        summary.textContent = "no misclassified digits: " + answer.missing;
        wrong.replaceChildren();
        return;
      }
      const count = (n) => Number(n).toLocaleString("en-US");
      summary.textContent = count(answer.wrong) + " of " + count(answer.total) + " test digits wrong ("
        + percent(answer.total ? 1 - answer.wrong / answer.total : null) + " right); the first "
        + answer.items.length + ", each with its true label and what the network said:";
      wrong.replaceChildren(...answer.items.map((item) => {
        const canvas = el("canvas", {width: 28, height: 28, role: "img",
                                     "aria-label": "test digit " + item.index + ": a " + item.label + " read as " + item.predicted});
        drawDigit(canvas, item.pixels);
        return el("figure", {}, canvas, el("figcaption", {text: item.label + " → " + item.predicted}));
      }));
    })
    .catch((error) => {
      if (state.learnedFor !== key) return;
      summary.textContent = "no misclassified digits: " + error.message;
      wrong.replaceChildren();
    });
}

// ---- the drawing pad -----------------------------------------------------------------------

const pad = $("pad");
const padCtx = pad.getContext("2d", {willReadFrequently: true});
const STROKE = 22;      // on the 280-pixel pad: ~2 pixels of 28 once the digit is scaled to 20 pixels
let drawing = null;     // the pointer drawing, {id, x, y}
let hasInk = false;

function clearPad() {
  padCtx.fillStyle = "#000";
  padCtx.fillRect(0, 0, pad.width, pad.height);
  hasInk = false;
  $("seen").getContext("2d").clearRect(0, 0, 28, 28);
  showPrediction(null);
  $("predict-note").textContent = "";
}

function padPoint(event) {
  const rect = pad.getBoundingClientRect();
  return {x: (event.clientX - rect.left) * pad.width / rect.width, y: (event.clientY - rect.top) * pad.height / rect.height};
}

function strokeTo(point) {
  padCtx.strokeStyle = "#fff";
  padCtx.lineWidth = STROKE;
  padCtx.lineCap = "round";
  padCtx.lineJoin = "round";
  padCtx.beginPath();
  padCtx.moveTo(drawing.x, drawing.y);
  padCtx.lineTo(point.x, point.y);
  padCtx.stroke();
  drawing.x = point.x;
  drawing.y = point.y;
  hasInk = true;
  predictSoon();
}

pad.addEventListener("pointerdown", (event) => {
  if (event.button !== 0) return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  const point = padPoint(event);
  drawing = {id: event.pointerId, x: point.x, y: point.y};
  strokeTo(point);   // a dot, for a tap
});
pad.addEventListener("pointermove", (event) => {
  if (!drawing || event.pointerId !== drawing.id) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const e of events.length ? events : [event]) strokeTo(padPoint(e));
});
for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
  pad.addEventListener(type, (event) => {
    if (drawing && event.pointerId === drawing.id) drawing = null;
  });
}
pad.tabIndex = 0;   // focusable, so the keyboard can clear it
pad.addEventListener("keydown", (event) => {
  if (event.key === "Escape" || event.key === "Delete" || event.key === "Backspace") {
    event.preventDefault();
    clearPad();
  }
});
$("clear").addEventListener("click", clearPad);

// The drawing as MNIST's digits were made: crop to the ink, scale the longer side to 20 pixels
// keeping the aspect ratio (averaging the area each new pixel covers), and put that in a 28x28
// field so that the centre of mass of the ink falls on its centre. 0 = background, 255 = ink.
function mnistPixels() {
  const w = pad.width, h = pad.height;
  const rgba = padCtx.getImageData(0, 0, w, h).data;
  const ink = new Float32Array(w * h);
  let x0 = w, y0 = h, x1 = -1, y1 = -1;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const v = rgba[4 * (y * w + x)];
      ink[y * w + x] = v;
      if (v > 0) {
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
  }
  if (x1 < 0) return null;
  const cw = x1 - x0 + 1, ch = y1 - y0 + 1;
  const scale = 20 / Math.max(cw, ch);
  const sw = Math.max(1, Math.round(cw * scale)), sh = Math.max(1, Math.round(ch * scale));
  const small = areaResample(ink, w, x0, y0, cw, ch, sw, sh);

  // Centre of mass, in pixel-centre coordinates of the small image.
  let mass = 0, mx = 0, my = 0;
  for (let y = 0; y < sh; y++) {
    for (let x = 0; x < sw; x++) {
      const v = small[y * sw + x];
      mass += v; mx += v * (x + 0.5); my += v * (y + 0.5);
    }
  }
  const dx = Math.round(14 - mx / mass), dy = Math.round(14 - my / mass);
  const pixels = new Array(784).fill(0);
  for (let y = 0; y < sh; y++) {
    for (let x = 0; x < sw; x++) {
      const tx = x + dx, ty = y + dy;
      if (tx >= 0 && tx < 28 && ty >= 0 && ty < 28) pixels[ty * 28 + tx] = Math.max(0, Math.min(255, Math.round(small[y * sw + x])));
    }
  }
  return pixels;
}

// Shrink the (cw x ch) block at (x0, y0) of `src` (row length `stride`) to (sw x sh): each new
// pixel is the mean of the source area it covers, partly covered source pixels counting in part.
function areaResample(src, stride, x0, y0, cw, ch, sw, sh) {
  const weights = (from, to) => {
    // weights[t] = [[source index, weight], ...] with the weights summing to 1.
    const ratio = from / to, rows = [];
    for (let t = 0; t < to; t++) {
      const a = t * ratio, b = (t + 1) * ratio, row = [];
      for (let s = Math.floor(a); s < Math.min(from, Math.ceil(b)); s++) {
        const overlap = Math.min(b, s + 1) - Math.max(a, s);
        if (overlap > 0) row.push([s, overlap / ratio]);
      }
      rows.push(row);
    }
    return rows;
  };
  const wx = weights(cw, sw), wy = weights(ch, sh);
  const across = new Float32Array(sw * ch);   // rows first, then columns
  for (let y = 0; y < ch; y++) {
    const base = (y0 + y) * stride + x0;
    for (let t = 0; t < sw; t++) {
      let sum = 0;
      for (const [s, weight] of wx[t]) sum += src[base + s] * weight;
      across[y * sw + t] = sum;
    }
  }
  const out = new Float32Array(sw * sh);
  for (let t = 0; t < sh; t++) {
    for (let x = 0; x < sw; x++) {
      let sum = 0;
      for (const [s, weight] of wy[t]) sum += across[s * sw + x] * weight;
      out[t * sw + x] = sum;
    }
  }
  return out;
}

function showPrediction(answer) {
  const bars = $("probabilities");
  if (!answer) {
    $("prediction").textContent = "–";
    bars.replaceChildren();
    return;
  }
  $("prediction").textContent = String(answer.digit);
  bars.replaceChildren(...answer.probabilities.map((p, digit) => {
    const fill = el("div", {class: "fill"});
    fill.style.width = (100 * p).toFixed(1) + "%";
    return el("div", {class: "bar" + (digit === answer.digit ? " best" : ""), "data-digit": String(digit),
                      "data-p": String(p), role: "img", "aria-label": digit + ": " + percent(p, 1)},
      el("span", {text: String(digit)}), el("div", {class: "track"}, fill), el("span", {class: "pct", text: percent(p, 1)}));
  }));
}

// Ask at most every 100 ms while drawing; the answer to an older drawing is dropped.
let predictTimer = null, predictSerial = 0;
function predictSoon() {
  if (predictTimer === null) predictTimer = setTimeout(() => { predictTimer = null; predict(); }, 100);
}

async function predict() {
  if (!hasInk) return;
  const pixels = mnistPixels();
  if (!pixels) return;
  drawDigit($("seen"), pixels);
  const name = state.selected, info = runInfo(name), note = $("predict-note");
  if (!name || !info) {
    note.textContent = "no run to ask: train one first";
    return;
  }
  if (!info.epoch) {
    note.textContent = "run " + name + " has no weights yet (they come after its first epoch)";
    return;
  }
  const serial = ++predictSerial;
  try {
    const answer = await getJSON(api(name, "predict"), {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({pixels}),
    });
    if (serial !== predictSerial) return;
    showPrediction(answer);
    note.textContent = "run " + name + ", after epoch " + info.epoch;
  } catch (error) {
    if (serial !== predictSerial) return;
    showPrediction(null);
    note.textContent = "cannot read it: " + error.message;
  }
}

// ---- start ---------------------------------------------------------------------------------

clearPad();
$("timeline").addEventListener("mousemove", hoverTimeline);
$("timeline").addEventListener("mouseleave", () => { $("timeline-hover").textContent = ""; });
let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(drawCurves, 100);
});
drawCurves();
window.addEventListener("hashchange", () => {
  // #run=NAME edited by hand (or a link followed): show that run.
  const wanted = hashRun();
  if (wanted && runInfo(wanted)) select(wanted);
});
let lastEpoch = null;
async function tick() {
  await refreshRuns();
  // New weights (an epoch ended): read the drawing again with them.
  const info = runInfo(state.selected);
  const epochKey = info ? info.name + "@" + info.epoch : null;
  if (lastEpoch !== null && epochKey !== lastEpoch) predictSoon();
  lastEpoch = epochKey;
  setTimeout(tick, 2000);
}
tick();

})();
