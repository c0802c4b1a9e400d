// The admin panel's scripts: uploads with progress, conversion options, live updates
// over the websocket (with polling while it is down, and reconnection), the cron
// preview. No inline scripts anywhere (the CSP forbids them); every string from the
// server is put in the page with textContent, never as HTML.
(function () {
  "use strict";

  const FINISHED = ["succeeded", "failed", "cancelled"];
  const csrfToken = () => document.querySelector('meta[name="csrf-token"]').content;

  function el(tag, attributes, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function humanSize(size) {
    const units = ["B", "KB", "MB", "GB", "TB"];
    let value = size;
    for (const unit of units) {
      if (value < 1024 || unit === "TB") return unit === "B" ? value + " B" : value.toFixed(1) + " " + unit;
      value /= 1024;
    }
    return size + " B";
  }

  function shortTime(iso) {
    return iso ? iso.slice(0, 19).replace("T", " ") : "";
  }

  function setLiveStatus(state, text) {
    document.body.dataset.live = state;
    const status = document.getElementById("live-status");
    if (status) status.textContent = text;
  }

  // -- forms that ask first ------------------------------------------------------------
  document.addEventListener("submit", function (event) {
    const form = event.target;
    if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
    }
  }, true);

  // -- live updates ---------------------------------------------------------------------
  // Subscribes to channels; on every event calls onEvent(type, data). While the socket
  // is down it calls poll() every few seconds, and it reconnects with a growing delay.
  function Live(channels, onEvent, poll) {
    let socket = null;
    let retryDelay = 1000;
    let pollTimer = null;
    let nextId = 1;

    function startPolling() {
      if (!poll || pollTimer) return;
      pollTimer = window.setInterval(poll, 3000);
      poll();
    }

    function stopPolling() {
      if (pollTimer) window.clearInterval(pollTimer);
      pollTimer = null;
    }

    function connect() {
      const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
      try {
        socket = new WebSocket(scheme + window.location.host + "/ws");
      } catch (error) {
        setLiveStatus("polling", "Live updates interrupted; reconnecting…");
        startPolling();
        scheduleReconnect();
        return;
      }
      socket.addEventListener("open", function () {
        retryDelay = 1000;
        for (const channel of channels) {
          socket.send(JSON.stringify({ method: "subscribe", data: { channel: channel }, correlation_id: nextId++ }));
        }
      });
      socket.addEventListener("message", function (message) {
        let frame;
        try { frame = JSON.parse(message.data); } catch (error) { return; }
        if (frame.type === "result") {
          if (frame.success) {
            stopPolling();
            setLiveStatus("connected", "Live updates on.");
            if (poll) poll();  // catch up with what happened while disconnected
          } else {
            setLiveStatus("refused", "Live updates are not available here.");
          }
        } else if (frame.type === "event" && frame.event !== "connected") {
          onEvent(frame.event, frame.data);
        }
      });
      socket.addEventListener("close", function () {
        setLiveStatus("polling", "Live updates interrupted; reconnecting…");
        startPolling();
        scheduleReconnect();
      });
    }

    function scheduleReconnect() {
      window.setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 15000);
    }

    connect();
    return { close: function () { if (socket) socket.close(); } };
  }
  window.AdminLive = Live;

  // -- conversions -------------------------------------------------------------------------
  function postButton(action, label, css, confirmText, describe) {
    const form = el("form", { method: "post", action: action, class: "inline" });
    if (confirmText) form.dataset.confirm = confirmText;
    form.appendChild(el("input", { type: "hidden", name: "csrf_token", value: csrfToken() }));
    const button = el("button", { type: "submit", class: css }, label);
    if (describe) button.setAttribute("aria-label", label + " " + describe);
    form.appendChild(button);
    return form;
  }

  function renderActions(container, job, withDelete) {
    container.replaceChildren();
    const base = "/conversions/" + encodeURIComponent(job.id);
    // In a list, each button says which job it acts on (to a screen reader).
    const describe = withDelete ? "" : "conversion of " + job.input.name;
    if (job.state === "queued" || job.state === "running") container.appendChild(postButton(base + "/cancel", "Cancel", "secondary", "", describe));
    if (job.state === "failed" || job.state === "cancelled") container.appendChild(postButton(base + "/retry", "Retry", "secondary", "", describe));
    if (job.state === "succeeded") {
      const link = el("a", { class: "button", href: base + "/download" }, "Download");
      if (withDelete) link.id = "download";
      else link.setAttribute("aria-label", "Download the output of " + job.input.name);
      container.appendChild(link);
    }
    if (withDelete) container.appendChild(postButton(base + "/delete", "Delete", "danger", "Delete this conversion and its output?"));
  }

  function percentOf(job) {
    if (job.progress && job.progress.percent !== null && job.progress.percent !== undefined) return Math.round(job.progress.percent);
    return job.state === "succeeded" ? 100 : 0;
  }

  function updateJob(container, job, withDelete) {
    const field = (name) => container.querySelector('[data-field="' + name + '"]');
    const state = field("state");
    if (state) { state.textContent = job.state; state.className = "badge state-" + job.state; }
    const progress = field("progress");
    const percent = percentOf(job);
    if (progress) { progress.value = percent; progress.textContent = percent + "%"; }
    const percentText = field("percent");
    if (percentText) percentText.textContent = percent + "%";
    const finished = field("finished_at");
    if (finished) finished.textContent = withDelete ? (job.finished_at || "") : shortTime(job.finished_at);
    const started = field("started_at");
    if (started) started.textContent = job.started_at || "";
    const error = field("error");
    if (error) error.textContent = job.error || "";
    const attempts = field("attempts");
    if (attempts) attempts.textContent = job.attempts;
    const output = field("output");
    if (output) {
      output.textContent = job.output
        ? job.output.name + " (" + humanSize(job.output.size) + (job.output.rows !== null ? ", " + job.output.rows + " rows" : "") + ")"
        : "none yet";
    }
    const actions = field("actions");
    if (actions && actions.dataset.state !== job.state) {
      actions.dataset.state = job.state;
      renderActions(actions, job, withDelete);
    }
  }

  function jobRow(job) {
    const row = el("tr", { "data-job-id": job.id });
    const name = el("td");
    name.appendChild(el("a", { href: "/conversions/" + encodeURIComponent(job.id) }, job.input.name));
    row.appendChild(name);
    row.appendChild(el("td", {}, job.target_format));
    const state = el("td");
    state.appendChild(el("span", { class: "badge", "data-field": "state" }));
    row.appendChild(state);
    const progress = el("td");
    progress.appendChild(el("progress", { max: "100", value: "0", "data-field": "progress", "aria-label": "Progress of " + job.input.name }));
    progress.appendChild(el("span", { "data-field": "percent" }));
    row.appendChild(progress);
    const created = el("td");
    created.appendChild(el("time", { "data-field": "created_at" }, shortTime(job.created_at)));
    row.appendChild(created);
    const finished = el("td");
    finished.appendChild(el("time", { "data-field": "finished_at" }));
    row.appendChild(finished);
    row.appendChild(el("td", { "data-field": "actions" }));
    return row;
  }

  function setupJobList() {
    const table = document.getElementById("jobs");
    if (!table) return;
    const body = table.querySelector("tbody");
    const page = Number(table.dataset.page || "1");
    const stateFilter = table.dataset.state || "";

    function upsert(job, insertNew) {
      let row = body.querySelector('tr[data-job-id="' + CSS.escape(job.id) + '"]');
      if (!row) {
        if (!insertNew || page !== 1 || (stateFilter && stateFilter !== job.state)) return;
        const empty = body.querySelector("tr.empty");
        if (empty) empty.remove();
        row = jobRow(job);
        body.insertBefore(row, body.firstChild);
      }
      updateJob(row, job, false);
    }

    function poll() {
      const query = new URLSearchParams({ page: String(page), per_page: table.dataset.perPage || "20" });
      if (stateFilter) query.set("state", stateFilter);
      fetch("/conversions/poll?" + query.toString(), { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then((response) => (response.ok ? response.json() : null))
        .then((data) => { if (data) data.items.slice().reverse().forEach((job) => upsert(job, true)); })
        .catch(() => {});
    }

    Live(["jobs"], function (type, job) { if (type === "job") upsert(job, true); }, poll);
  }

  function setupJobDetail() {
    const section = document.getElementById("job");
    if (!section) return;
    const jobId = section.dataset.jobId;
    function poll() {
      fetch("/conversions/" + encodeURIComponent(jobId), { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then((response) => (response.ok ? response.json() : null))
        .then((job) => { if (job) updateJob(section, job, true); })
        .catch(() => {});
    }
    Live(["job:" + jobId], function (type, job) { if (type === "job" && job.id === jobId) updateJob(section, job, true); }, poll);
  }

  function setupUpload() {
    const uploadForm = document.getElementById("upload-form");
    if (!uploadForm) return;
    const formatsData = JSON.parse(document.getElementById("formats-data").textContent);
    const formats = {};
    for (const format of formatsData.formats) formats[format.name] = format;
    const pairs = formatsData.pairs.map((pair) => pair[0] + ">" + pair[1]);
    const startForm = document.getElementById("start-form");
    const target = document.getElementById("target-format");
    const progress = document.getElementById("upload-progress");
    const message = document.getElementById("upload-message");
    const limit = Number(uploadForm.dataset.limit);

    function optionFields(fieldset, side, options) {
      fieldset.querySelectorAll(".option").forEach((node) => node.remove());
      const names = Object.keys(options || {});
      fieldset.hidden = names.length === 0;
      for (const name of names) {
        const wrapper = el("div", { class: "option" });
        const id = side + "-" + name;
        wrapper.appendChild(el("label", { for: id }, name.replace(/_/g, " ")));
        let input;
        const allowed = options[name];
        if (allowed || name === "header") {
          input = el("select", { id: id, name: side + "." + name });
          input.appendChild(el("option", { value: "" }, "(default)"));
          for (const value of allowed || ["true", "false"]) input.appendChild(el("option", { value: value }, value));
        } else {
          input = el("input", { id: id, name: side + "." + name, placeholder: name === "null_values" ? "comma-separated" : "(default)" });
        }
        wrapper.appendChild(input);
        fieldset.appendChild(wrapper);
      }
    }

    function showStart(file) {
      document.getElementById("start-file-id").value = file.id;
      document.getElementById("start-file-format").value = file.format;
      document.getElementById("start-file-name").textContent = file.name;
      document.getElementById("start-file-desc").textContent = file.format + ", " + humanSize(file.size);
      for (const option of target.options) option.disabled = !pairs.includes(file.format + ">" + option.value);
      const firstAllowed = Array.from(target.options).find((option) => !option.disabled && option.value !== file.format);
      if (firstAllowed) target.value = firstAllowed.value;
      startForm.hidden = false;
      renderOptions();
      target.focus();
    }

    function renderOptions() {
      const source = document.getElementById("start-file-format").value;
      optionFields(document.getElementById("read-options"), "read", source && formats[source] ? formats[source].read_options : {});
      optionFields(document.getElementById("write-options"), "write", formats[target.value] ? formats[target.value].write_options : {});
    }

    target.addEventListener("change", renderOptions);
    if (!startForm.hidden) {
      const format = document.getElementById("start-file-format").value;
      for (const option of target.options) option.disabled = !pairs.includes(format + ">" + option.value);
      renderOptions();
    }

    uploadForm.addEventListener("submit", function (event) {
      event.preventDefault();
      const file = document.getElementById("upload-file").files[0];
      if (!file) return;
      if (file.size > limit) {
        message.textContent = "This file is " + humanSize(file.size) + "; the upload limit is " + uploadForm.dataset.limitText + ".";
        message.className = "error";
        return;
      }
      const request = new XMLHttpRequest();
      request.open("POST", "/conversions/upload?name=" + encodeURIComponent(file.name));
      request.setRequestHeader("X-CSRF-Token", csrfToken());
      request.setRequestHeader("Accept", "application/json");
      request.setRequestHeader("Content-Type", "application/octet-stream");
      progress.hidden = false;
      progress.value = 0;
      message.className = "";
      message.textContent = "Uploading " + file.name + "…";
      request.upload.addEventListener("progress", function (progressEvent) {
        if (progressEvent.lengthComputable) progress.value = Math.round((100 * progressEvent.loaded) / progressEvent.total);
      });
      request.addEventListener("load", function () {
        let body = null;
        try { body = JSON.parse(request.responseText); } catch (error) { body = null; }
        if (request.status === 201 && body) {
          progress.value = 100;
          message.textContent = "Uploaded " + body.name + ".";
          showStart(body);
        } else if (request.status === 413) {
          message.className = "error";
          message.textContent = "Too large: " + ((body && body.detail) || "the file is over the upload limit of " + uploadForm.dataset.limitText) + ".";
        } else {
          message.className = "error";
          message.textContent = "Upload failed: " + ((body && body.detail) || "HTTP " + request.status) + ".";
        }
      });
      request.addEventListener("error", function () {
        message.className = "error";
        message.textContent = "Upload failed: the connection was lost.";
      });
      request.send(file);
    });
  }

  // -- schedules ---------------------------------------------------------------------------
  function setupScheduleForm() {
    const form = document.getElementById("schedule-form");
    if (!form) return;
    const preview = document.getElementById("cron-preview");
    const cron = document.getElementById("cron");
    const timezone = document.getElementById("timezone");
    let timer = null;

    function showTarget() {
      const kind = form.querySelector('input[name="target_kind"]:checked').value;
      form.querySelectorAll("[data-target]").forEach((node) => { node.hidden = node.dataset.target !== kind; });
    }
    form.querySelectorAll('input[name="target_kind"]').forEach((radio) => radio.addEventListener("change", showTarget));
    showTarget();

    function refreshPreview() {
      if (!cron.value.trim()) { preview.replaceChildren(); return; }
      const query = new URLSearchParams({ cron: cron.value, timezone: timezone.value || "UTC" });
      fetch("/schedules/preview?" + query.toString(), { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then((response) => response.json().then((body) => ({ ok: response.ok, body: body })))
        .then(function (result) {
          preview.replaceChildren();
          if (result.ok) {
            preview.appendChild(el("p", {}, "Next fire times:"));
            const list = el("ol");
            for (const time of result.body.fire_times) list.appendChild(el("li", {}, time));
            preview.appendChild(list);
          } else {
            const errors = result.body.errors || {};
            const text = Object.keys(errors).length ? Object.entries(errors).map(([k, v]) => k + ": " + v).join("; ") : result.body.detail;
            preview.appendChild(el("p", { class: "field-error" }, "Invalid: " + text));
          }
        })
        .catch(() => {});
    }
    function schedule() { window.clearTimeout(timer); timer = window.setTimeout(refreshPreview, 300); }
    cron.addEventListener("input", schedule);
    timezone.addEventListener("input", schedule);

    const runs = document.getElementById("runs");
    if (runs) {
      const body = runs.querySelector("tbody");
      const scheduleId = runs.dataset.scheduleId;
      const showRun = function (run) {
        let row = body.querySelector('tr[data-run-id="' + CSS.escape(String(run.id)) + '"]');
        if (!row) {
          const empty = body.querySelector("tr.empty");
          if (empty) empty.remove();
          row = el("tr", { "data-run-id": String(run.id) });
          const newer = Array.from(body.querySelectorAll("tr[data-run-id]")).find((other) => Number(other.dataset.runId) < run.id);
          body.insertBefore(row, newer || null);
        }
        row.replaceChildren();
        row.appendChild(el("td", {}, run.scheduled_for));
        const outcome = el("td");
        outcome.appendChild(el("span", { class: "badge state-" + run.outcome, "data-field": "state" }, run.outcome));
        row.appendChild(outcome);
        row.appendChild(el("td", {}, run.started_at || ""));
        row.appendChild(el("td", {}, run.finished_at || ""));
        row.appendChild(el("td", {}, run.error || run.result_summary || ""));
      };
      const poll = function () {
        fetch("/schedules/" + encodeURIComponent(scheduleId), { headers: { Accept: "application/json" }, credentials: "same-origin" })
          .then((response) => (response.ok ? response.json() : null))
          .then((schedule) => { if (schedule) schedule.last_runs.slice().reverse().forEach(showRun); })
          .catch(() => {});
      };
      Live(["schedule:" + scheduleId], function (type, data) { if (type === "run") showRun(data.run); }, poll);
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    setupUpload();
    setupJobList();
    setupJobDetail();
    setupScheduleForm();
  });
})();
