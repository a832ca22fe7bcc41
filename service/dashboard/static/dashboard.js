// lipcert dashboard: plain JavaScript over the /v1 API (no framework, nothing from a CDN).
//
// Every call sends the API key the user typed, kept in this tab's sessionStorage, as the
// X-API-Key header (never in a URL). Job progress is read from /v1/jobs/{id}/events with
// fetch() and a small server-sent-events parser (EventSource cannot send headers). Plots are
// SVG drawn by plots.js from the certify results.
(function () {
  "use strict";

  var KEY = "lipcert-api-key";
  var ROOT = document.getElementById("main").getAttribute("data-root") || "";
  var plots = window.LipcertPlots;
  var fmt = plots.fmt;
  var pct = plots.pct;
  var certifiedAt = plots.certifiedAt;
  var TERMINAL = ["succeeded", "failed", "cancelled"];

  var state = {
    models: [],
    bounds: {}, // model id -> GET /v1/models/{id}/bounds answer
    selected: "",
    job: null, // {id, controller}
    testset: null, // File
    results: null, // certify answer (JSON)
    resultsQuery: "",
    status: null,
    keyDismissed: false, // the user closed the key dialog: do not reopen it by itself
  };

  function $(id) {
    return document.getElementById(id);
  }

  // --- HTTP -----------------------------------------------------------------------------------

  function ApiError(status, detail, code) {
    this.status = status;
    this.message = detail;
    this.code = code;
  }

  function withKey(extra) {
    var h = new Headers(extra || {});
    var key = window.sessionStorage.getItem(KEY);
    if (key) {
      h.set("X-API-Key", key);
    }
    return h;
  }

  async function api(path, opts) {
    opts = opts || {};
    var init = Object.assign({}, opts, { headers: withKey(opts.headers) });
    var r = await fetch(ROOT + path, init);
    if (r.ok) {
      return r;
    }
    var problem = null;
    try {
      problem = await r.json();
    } catch (e) {
      problem = null;
    }
    if (r.status === 401 && !state.keyDismissed) {
      askKey(window.sessionStorage.getItem(KEY) ? "The API key was refused." : "");
    }
    var detail = (problem && (problem.detail || problem.title)) || r.status + " " + r.statusText;
    throw new ApiError(r.status, detail, problem && problem.code);
  }

  async function getJson(path) {
    return (await api(path)).json();
  }

  function notify(text, isError) {
    var el = $("notice");
    el.textContent = text || "";
    el.className = "notice" + (isError ? " error" : "");
  }

  function fail(err) {
    if (err && err.status === 401) {
      notify("An API key is needed (" + err.message + ").", true);
      return;
    }
    notify((err && err.message) || String(err), true);
  }

  function download(blob, name) {
    var url = URL.createObjectURL(blob);
    var a = document.createElement("a");
    a.href = url;
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () {
      URL.revokeObjectURL(url);
    }, 10000);
  }

  // --- formatting -----------------------------------------------------------------------------

  function shape(s) {
    return s ? "(" + s.join(", ") + ")" : "–";
  }

  // Relative gap between a verified upper bound L and an empirical lower bound l: (L - l) / l.
  function gap(bound) {
    if (!bound || typeof bound.lower_bound !== "number" || !(bound.lower_bound > 0)) {
      return null;
    }
    return (bound.lipschitz_bound - bound.lower_bound) / bound.lower_bound;
  }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") {
        node.textContent = attrs[k];
      } else if (k === "className") {
        node.className = attrs[k];
      } else if (k.slice(0, 2) === "on") {
        node.addEventListener(k.slice(2), attrs[k]);
      } else {
        node.setAttribute(k, attrs[k]);
      }
    });
    (children || []).forEach(function (c) {
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function cell(text, numeric) {
    return el("td", { text: text, className: numeric ? "num" : "" });
  }

  // --- API key --------------------------------------------------------------------------------

  function askKey(why) {
    var dialog = $("key-dialog");
    if (dialog.open) {
      return;
    }
    $("key-input").value = "";
    var p = dialog.querySelector("p");
    p.dataset.base = p.dataset.base || p.textContent;
    p.textContent = (why ? why + " " : "") + p.dataset.base;
    dialog.showModal();
    $("key-input").focus();
  }

  function setupKey() {
    $("key-button").addEventListener("click", function () {
      askKey("");
    });
    // Cancel or Escape: no more asking on every refused call until the button is used
    $("key-dialog").addEventListener("cancel", function () {
      state.keyDismissed = true;
    });
    $("key-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var key = $("key-input").value.trim();
      if (key) {
        window.sessionStorage.setItem(KEY, key);
      }
      state.keyDismissed = false;
      $("key-dialog").close();
      notify("");
      refreshAll();
    });
    $("key-forget").addEventListener("click", function () {
      window.sessionStorage.removeItem(KEY);
      state.keyDismissed = true;
      $("key-dialog").close();
      notify("API key forgotten.");
    });
    $("key-cancel").addEventListener("click", function () {
      state.keyDismissed = true;
      $("key-dialog").close();
    });
  }

  // --- server status --------------------------------------------------------------------------

  async function refreshStatus() {
    var s = await getJson("/v1/status");
    state.status = s;
    $("st-version").textContent = s.version;
    $("st-ready").textContent = s.ready
      ? "yes"
      : "no: " + s.not_ready.map(function (r) { return r.detail; }).join("; ");
    $("st-ready").className = s.ready ? "" : "status-failed";
    $("st-device").textContent = s.device + " (" + s.dtype + ")";
    $("st-solver").textContent = s.solver_device;
    $("st-runner").textContent = s.runner || "none";
    $("st-queued").textContent = String(s.jobs.queued || 0);
    $("st-running").textContent = String(s.jobs.running || 0);
    $("st-inference").textContent = String(s.inference_queue);
    $("st-key").textContent = s.api_key_required ? "required" : "not required";
    renderActive(s.active_jobs);
    setModes(s.certify_modes || ["global"]);
    setSolvers(s.solvers || []);
  }

  function setSolvers(names) {
    var select = $("bound-solver");
    if (select.options.length > 1) {
      return;
    }
    names.forEach(function (n) {
      select.appendChild(el("option", { value: n, text: n }));
    });
  }

  // The queued and running jobs, each with a button that follows it in the Bounds panel
  // (rebuilt only when something changed, so keyboard focus stays put between polls).
  function renderActive(jobs) {
    var list = $("st-active");
    var key = JSON.stringify(jobs);
    if (list.dataset.shown === key) {
      return;
    }
    list.dataset.shown = key;
    list.replaceChildren();
    jobs.forEach(function (j) {
      var p = j.progress || {};
      var what = [j.status, j.method, "model " + j.model_id];
      if (p.phase) {
        what.push("phase " + p.phase);
      }
      if (p.iteration !== undefined) {
        what.push("iteration " + p.iteration);
      }
      var watching = state.job && state.job.id === j.job_id;
      list.appendChild(
        el("li", {}, [
          "Job " + j.job_id.slice(0, 8) + ": " + what.join(", ") + " ",
          el("button", {
            type: "button",
            className: "small secondary",
            text: watching ? "Watching" : "Watch",
            "aria-label": "Watch job " + j.job_id.slice(0, 8),
            onclick: function () {
              follow(j);
            },
          }),
        ])
      );
    });
  }

  function follow(job) {
    if (state.job) {
      if (state.job.id === job.job_id) {
        return;
      }
      state.job.controller.abort();
    }
    if (job.model_id !== state.selected && state.bounds[job.model_id]) {
      select(job.model_id);
    }
    $("job-log").replaceChildren();
    showJob({ id: job.job_id, status: job.status, phase: "–", iteration: "–", gap: "–", result: "–" });
    watchJob(job.job_id).catch(fail);
  }

  function setModes(modes) {
    var select = $("certify-mode");
    var have = Array.prototype.map.call(select.options, function (o) {
      return o.value;
    });
    modes.forEach(function (m) {
      if (have.indexOf(m) < 0) {
        var label = m === "local" ? "local (per-input verification, slower)" : m;
        select.appendChild(el("option", { value: m, text: label }));
      }
    });
    select.disabled = modes.length < 2;
  }

  // --- models ---------------------------------------------------------------------------------

  async function refreshModels() {
    var answer = await getJson("/v1/models");
    state.models = answer.models;
    var bounds = await Promise.all(
      state.models.map(function (m) {
        return getJson("/v1/models/" + m.id + "/bounds").catch(function () {
          return { bounds: [], best: null };
        });
      })
    );
    state.bounds = {};
    state.models.forEach(function (m, i) {
      state.bounds[m.id] = bounds[i];
    });
    if (state.selected && !state.bounds[state.selected]) {
      state.selected = "";
    }
    if (!state.selected && state.models.length) {
      state.selected = state.models[state.models.length - 1].id;
    }
    renderModels();
    renderSelected();
  }

  function renderModels() {
    var body = $("models-table").querySelector("tbody");
    body.replaceChildren();
    $("models-empty").hidden = state.models.length > 0;
    $("models-table").parentElement.hidden = state.models.length === 0;
    state.models.forEach(function (m) {
      var best = (state.bounds[m.id] || {}).best;
      var g = gap(best);
      var tr = el("tr", { "data-model": m.id });
      if (m.id === state.selected) {
        tr.className = "selected";
      }
      tr.appendChild(el("td", { title: m.id, text: m.filename || m.id }));
      tr.appendChild(cell(m.format));
      tr.appendChild(cell(m.kind));
      tr.appendChild(cell(shape(m.input_shape)));
      tr.appendChild(cell(shape(m.output_shape)));
      tr.appendChild(cell(m.parameters.toLocaleString("en"), true));
      tr.appendChild(cell(best ? fmt(best.lipschitz_bound, 6) : "–", true));
      tr.appendChild(cell(best ? best.method : "–"));
      tr.appendChild(cell(best ? fmt(best.lower_bound, 6) : "–", true));
      tr.appendChild(cell(g === null ? "–" : pct(g), true));
      var name = m.filename || m.id;
      var actions = el("div", { className: "row" }, [
        el("button", {
          type: "button",
          className: "small secondary",
          text: "Select",
          "aria-label": "Select " + name,
          "aria-pressed": String(m.id === state.selected),
          onclick: function () {
            select(m.id);
          },
        }),
        el("button", {
          type: "button",
          className: "small secondary",
          text: "Certificate",
          "aria-label": "Download the best bound's certificate of " + name,
          onclick: function () {
            downloadCertificate(m.id, best).catch(fail);
          },
        }),
        el("button", {
          type: "button",
          className: "small danger",
          text: "Delete",
          "aria-label": "Delete " + name,
          onclick: function () {
            deleteModel(m).catch(fail);
          },
        }),
      ]);
      if (!best) {
        actions.children[1].disabled = true;
      }
      tr.appendChild(el("td", {}, [actions]));
      body.appendChild(tr);
    });
  }

  function select(id) {
    state.selected = id;
    state.results = null;
    $("results").hidden = true;
    renderModels();
    renderSelected();
  }

  function renderSelected() {
    var sel = $("model-select");
    sel.replaceChildren(el("option", { value: "", text: "(none)" }));
    state.models.forEach(function (m) {
      sel.appendChild(el("option", { value: m.id, text: (m.filename || m.id) + " · " + m.id }));
    });
    sel.value = state.selected;
    var info = state.bounds[state.selected] || { bounds: [], best: null };
    var body = $("bounds-table").querySelector("tbody");
    body.replaceChildren();
    info.bounds.forEach(function (b) {
      var g = gap(b);
      var tr = el("tr");
      tr.appendChild(cell(b.method));
      tr.appendChild(cell(fmt(b.lipschitz_bound, 6), true));
      tr.appendChild(cell(fmt(b.lower_bound, 6), true));
      tr.appendChild(cell(g === null ? "–" : pct(g), true));
      tr.appendChild(cell(b.job_id ? b.job_id.slice(0, 8) : b.source || "–"));
      tr.appendChild(cell((b.created_at || "").replace("T", " ").slice(0, 19)));
      tr.appendChild(
        el("td", {}, [
          el("button", {
            type: "button",
            className: "small secondary",
            text: "Download",
            "aria-label": "Download the certificate of the " + b.method + " bound",
            onclick: function () {
              downloadCertificate(state.selected, b).catch(fail);
            },
          }),
        ])
      );
      body.appendChild(tr);
    });
    var boundSel = $("certify-bound");
    var before = boundSel.value;
    boundSel.replaceChildren();
    var best = info.best;
    boundSel.appendChild(
      el("option", {
        value: "best",
        text: best ? "best verified: L = " + fmt(best.lipschitz_bound, 6) + " (" + best.method + ")" : "best verified (none yet)",
      })
    );
    info.bounds.forEach(function (b) {
      if (b.job_id) {
        boundSel.appendChild(
          el("option", { value: b.job_id, text: b.method + ": L = " + fmt(b.lipschitz_bound, 6) })
        );
      }
    });
    boundSel.value = Array.prototype.some.call(boundSel.options, function (o) {
      return o.value === before;
    })
      ? before
      : "best";
    var none = !state.selected;
    $("bound-start").disabled = none || !!state.job;
    $("certify-run").disabled = none;
  }

  async function uploadModel(file) {
    if (!file) {
      return;
    }
    notify("Uploading " + file.name + " …");
    var form = new FormData();
    form.append("file", file, file.name);
    var r = await api("/v1/models", { method: "POST", body: form });
    var rec = await r.json();
    notify(
      (r.status === 201 ? "Uploaded " : "Already stored: ") +
        rec.filename + " (" + rec.format + ", " + rec.kind + ", id " + rec.id + ")."
    );
    state.selected = rec.id;
    await refreshModels();
  }

  async function deleteModel(m) {
    var name = m.filename || m.id;
    if (!window.confirm("Delete " + name + ", its file and its bounds?")) {
      return;
    }
    await api("/v1/models/" + m.id, { method: "DELETE" });
    notify("Deleted " + name + ".");
    if (state.selected === m.id) {
      state.selected = "";
    }
    await refreshModels();
  }

  // The full certificate (rho and the multipliers T) of one stored bound, as JSON.
  async function downloadCertificate(modelId, bound) {
    var full = await getJson("/v1/models/" + modelId + "/bounds?full=true");
    var match = full.bounds.filter(function (b) {
      return b.created_at === bound.created_at && b.method === bound.method && b.job_id === bound.job_id;
    });
    var doc = match.length ? match[0] : full.best;
    var body = JSON.stringify({ model_id: modelId, bound: doc }, null, 2);
    var name = "lipcert-" + modelId + "-" + doc.method + "-certificate.json";
    download(new Blob([body], { type: "application/json" }), name);
    notify("Certificate saved as " + name + ".");
  }

  function setupUpload() {
    var drop = $("drop");
    ["dragenter", "dragover"].forEach(function (t) {
      drop.addEventListener(t, function (ev) {
        ev.preventDefault();
        drop.classList.add("over");
      });
    });
    ["dragleave", "drop"].forEach(function (t) {
      drop.addEventListener(t, function (ev) {
        ev.preventDefault();
        drop.classList.remove("over");
      });
    });
    drop.addEventListener("drop", function (ev) {
      var files = ev.dataTransfer && ev.dataTransfer.files;
      if (files && files.length) {
        uploadModel(files[0]).catch(fail);
      }
    });
    $("model-file").addEventListener("change", function (ev) {
      var file = ev.target.files[0];
      ev.target.value = "";
      uploadModel(file).catch(fail);
    });
    $("model-select").addEventListener("change", function (ev) {
      select(ev.target.value);
    });
  }

  // --- bound jobs -----------------------------------------------------------------------------

  function showJob(fields) {
    $("job").hidden = false;
    Object.keys(fields).forEach(function (k) {
      var node = $("job-" + k);
      if (node) {
        node.textContent = fields[k];
        if (k === "status") {
          node.className = "status-" + fields[k];
        }
      }
    });
  }

  function logEvent(text) {
    var log = $("job-log");
    log.appendChild(el("li", { text: text }));
    while (log.children.length > 200) {
      log.removeChild(log.firstChild);
    }
    log.scrollTop = log.scrollHeight;
  }

  async function startBound(ev) {
    ev.preventDefault();
    if (!state.selected) {
      return;
    }
    var body = { method: $("bound-method").value, pairwise: $("bound-pairwise").checked };
    if ($("bound-solver").value) {
      body.solver = $("bound-solver").value;
    }
    var timeout = parseFloat($("bound-timeout").value);
    if (timeout > 0) {
      body.timeout_s = timeout;
    }
    var r = await api("/v1/models/" + state.selected + "/bounds", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    var job = await r.json();
    $("job-log").replaceChildren();
    showJob({ id: job.job_id, status: job.status, phase: "–", iteration: "–", gap: "–", result: "–" });
    logEvent("job " + job.job_id + (job.reused ? " (reused)" : "") + ": " + job.status);
    watchJob(job.job_id).catch(fail);
  }

  function parseEvent(block) {
    var ev = { event: "message", data: "" };
    var data = [];
    block.split("\n").forEach(function (line) {
      if (!line || line[0] === ":") {
        return;
      }
      var i = line.indexOf(":");
      var field = i < 0 ? line : line.slice(0, i);
      var value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
      if (field === "event") {
        ev.event = value;
      } else if (field === "data") {
        data.push(value);
      }
    });
    ev.data = data.join("\n");
    return data.length ? ev : null;
  }

  async function watchJob(jobId) {
    var controller = new AbortController();
    state.job = { id: jobId, controller: controller };
    $("bound-cancel").disabled = false;
    $("bound-start").disabled = true;
    var ended = false;
    try {
      var r = await api("/v1/jobs/" + jobId + "/events", {
        headers: { Accept: "text/event-stream" },
        signal: controller.signal,
      });
      var reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      var buf = "";
      for (;;) {
        var chunk = await reader.read();
        if (chunk.done) {
          break;
        }
        buf += chunk.value.replace(/\r\n?/g, "\n");
        var cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          var ev = parseEvent(buf.slice(0, cut));
          buf = buf.slice(cut + 2);
          if (ev) {
            ended = onJobEvent(ev.event, JSON.parse(ev.data)) || ended;
          }
        }
      }
    } catch (err) {
      if (err.name !== "AbortError") {
        fail(err);
      }
    }
    if (controller.signal.aborted) {
      return; // another job is followed now
    }
    if (!ended) {
      // the stream broke off: read the job's state once
      try {
        var job = await getJson("/v1/jobs/" + jobId);
        if (TERMINAL.indexOf(job.status) >= 0) {
          onJobEvent("end", job);
        }
      } catch (err) {
        fail(err);
      }
    }
    state.job = null;
    $("bound-cancel").disabled = true;
    renderSelected();
  }

  // Returns true for the final event.
  function onJobEvent(kind, data) {
    if (kind === "status") {
      showJob({ status: data.status });
      logEvent("status: " + data.status);
    } else if (kind === "progress") {
      var fields = { phase: data.phase || "–" };
      if (data.iteration !== undefined) {
        fields.iteration = String(data.iteration);
      }
      if (data.gap !== undefined) {
        fields.gap = fmt(data.gap, 3);
      } else if (data.residual !== undefined) {
        fields.gap = "residual " + fmt(data.residual, 3);
      }
      showJob(fields);
      var parts = Object.keys(data)
        .filter(function (k) {
          return k !== "job_id" && k !== "updated_at" && typeof data[k] !== "object";
        })
        .map(function (k) {
          return k + "=" + (typeof data[k] === "number" ? fmt(data[k], 4) : data[k]);
        });
      logEvent(parts.join(" "));
    } else if (kind === "end") {
      var result = data.result;
      var g = gap(result);
      showJob({
        status: data.status,
        gap: g === null ? $("job-gap").textContent : pct(g) + " to the lower bound",
        result: result
          ? "L = " + fmt(result.lipschitz_bound, 6) + " (" + result.method + ", verified)"
          : (data.error && data.error.code + ": " + data.error.detail) || data.status,
      });
      logEvent("end: " + data.status);
      notify(
        data.status === "succeeded"
          ? "Bound job finished: L = " + fmt(result.lipschitz_bound, 6) + "."
          : "Bound job " + data.status + ".",
        data.status !== "succeeded"
      );
      refreshModels().catch(fail);
      return true;
    } else if (kind === "error") {
      logEvent("error: " + (data.detail || data.code));
    }
    return false;
  }

  async function cancelJob() {
    if (!state.job) {
      return;
    }
    var id = state.job.id;
    var job = await (await api("/v1/jobs/" + id, { method: "DELETE" })).json();
    logEvent("cancel requested: " + job.status);
  }

  // --- certification --------------------------------------------------------------------------

  function certifyQuery(mode) {
    var q = new URLSearchParams();
    q.set("bound", $("certify-bound").value || "best");
    if (mode && mode !== "global") {
      q.set("mode", mode); // radius search: the radii give the whole curve
    } else {
      q.set("epsilon", String(epsilonValue()));
    }
    return q.toString();
  }

  function epsilonValue() {
    var eps = parseFloat($("certify-epsilon").value);
    return isFinite(eps) && eps >= 0 ? eps : 0;
  }

  async function runCertify(ev) {
    ev.preventDefault();
    var file = $("testset-file").files[0] || state.testset;
    if (!state.selected) {
      return;
    }
    if (!file) {
      notify("Choose a test set (.npz with inputs and labels) first.", true);
      $("testset-file").focus();
      return;
    }
    state.testset = file;
    var mode = $("certify-mode").value;
    notify("Certifying " + file.name + " …");
    $("certify-run").disabled = true;
    try {
      var query = certifyQuery(mode);
      var r = await api("/v1/models/" + state.selected + "/certify?" + query, {
        method: "POST",
        headers: { "Content-Type": "application/x-npz", Accept: "application/json" },
        body: file,
      });
      state.results = await r.json();
      state.resultsQuery = query;
      renderResults();
      notify("Certified " + state.results.results.length + " inputs of " + file.name + ".");
    } finally {
      $("certify-run").disabled = !state.selected;
    }
  }

  // certified at eps: classified correctly (when labels are known) and radius > eps
  function radiiOf(res) {
    return res.results.map(function (r, i) {
      var radius = typeof r.radius === "number" && isFinite(r.radius) ? Math.max(r.radius, 0) : 0;
      var correct = r.label === null || r.label === undefined ? true : r.prediction === r.label;
      return { index: i, radius: radius, correct: correct, label: r.label, prediction: r.prediction, margin: r.margin };
    });
  }

  function renderResults() {
    var res = state.results;
    var rows = radiiOf(res);
    var eps = epsilonValue();
    var labelled = rows.some(function (r) {
      return r.label !== null && r.label !== undefined;
    });
    $("results").hidden = false;
    $("res-n").textContent = String(rows.length);
    $("res-bound").textContent = fmt(res.lipschitz_bound, 6) + " (" + res.method + ")";
    $("res-accuracy").textContent = labelled ? pct(res.accuracy) : "no labels";
    $("res-certified").textContent = pct(certifiedAt(rows, eps)) + " at ε = " + fmt(eps);
    plots.curve($("curve"), rows, eps, labelled);
    plots.histogram($("histogram"), rows);
    var weakest = rows.slice().sort(function (a, b) {
      return a.radius - b.radius || a.index - b.index;
    });
    var body = $("weakest").querySelector("tbody");
    body.replaceChildren();
    weakest.slice(0, 10).forEach(function (r) {
      var tr = el("tr");
      tr.appendChild(cell(String(r.index), true));
      tr.appendChild(cell(r.label === null || r.label === undefined ? "–" : String(r.label), true));
      tr.appendChild(cell(String(r.prediction) + (r.correct ? "" : " (wrong)"), true));
      tr.appendChild(cell(fmt(r.margin, 4), true));
      tr.appendChild(cell(fmt(r.radius, 4), true));
      body.appendChild(tr);
    });
  }

  async function downloadNpz() {
    if (!state.results || !state.testset) {
      return;
    }
    var r = await api("/v1/models/" + state.selected + "/certify?" + state.resultsQuery, {
      method: "POST",
      headers: { "Content-Type": "application/x-npz", Accept: "application/x-npz" },
      body: state.testset,
    });
    download(await r.blob(), "lipcert-certify-" + state.results.model_id + ".npz");
  }

  function downloadTsv() {
    var res = state.results;
    if (!res) {
      return;
    }
    var cols = ["index", "prediction", "label", "correct", "margin", "radius", "radius_pairwise", "certified"];
    var lines = [cols.join("\t")];
    res.results.forEach(function (r, i) {
      var row = { index: i };
      cols.slice(1).forEach(function (c) {
        var v = r[c];
        row[c] = v === null || v === undefined ? "" : String(v);
      });
      lines.push(cols.map(function (c) { return row[c]; }).join("\t"));
    });
    var head = "# model " + res.model_id + ", L = " + res.lipschitz_bound + " (" + res.method + "), epsilon = " + res.epsilon;
    download(new Blob([head + "\n" + lines.join("\n") + "\n"], { type: "text/tab-separated-values" }), "lipcert-certify-" + res.model_id + ".tsv");
  }

  function setupCertify() {
    $("certify-form").addEventListener("submit", function (ev) {
      runCertify(ev).catch(fail);
    });
    $("testset-file").addEventListener("change", function (ev) {
      state.testset = ev.target.files[0] || null;
    });
    $("certify-epsilon").addEventListener("input", function () {
      if (state.results) {
        renderResults();
      }
    });
    $("download-npz").addEventListener("click", function () {
      downloadNpz().catch(fail);
    });
    $("download-tsv").addEventListener("click", downloadTsv);
  }

  // --- start ----------------------------------------------------------------------------------

  async function refreshAll() {
    try {
      await refreshStatus();
      await refreshModels();
    } catch (err) {
      fail(err);
    }
  }

  function pollStatus() {
    var again = function () {
      setTimeout(pollStatus, 3000);
    };
    if (document.hidden || $("key-dialog").open) {
      again();
      return;
    }
    refreshStatus().then(again, again);
  }

  setupKey();
  setupUpload();
  setupCertify();
  $("bound-form").addEventListener("submit", function (ev) {
    startBound(ev).catch(fail);
  });
  $("bound-cancel").addEventListener("click", function () {
    cancelJob().catch(fail);
  });
  refreshAll().then(function () {
    setTimeout(pollStatus, 3000);
    document.body.setAttribute("data-ready", "true");
  });
})();
