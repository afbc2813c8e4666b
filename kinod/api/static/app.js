// kinod's dashboard: plain JavaScript, no build step, nothing loaded from elsewhere.
// Every text from a job (names, messages, errors, parameters, logs) goes into the page
// through textContent or a Text node, never as markup.
"use strict";
(() => {
  const API = "/api/v1";
  const TASKS = API + "/generator/tasks";
  const STATES = ["held", "queued", "running", "succeeded", "failed", "stopped"];
  const ENDED = new Set(["succeeded", "failed", "stopped"]);
  const TOKEN_KEY = "kinod.token";
  const IMAGE = /\.(png|jpe?g|webp|gif|bmp|tiff?)$/i;
  const LOG_TAIL_BYTES = 65536;
  const MAX_OUTPUTS_SHOWN = 200;
  // What each row button asks, when it applies, and the endpoint it posts to.
  const ACTIONS = [
    { name: "Stop", action: "stop", path: "stop", when: (s) => s === "held" || s === "queued" || s === "running" },
    { name: "Hold", action: "hold", path: "hold", when: (s) => s === "queued" },
    { name: "Release", action: "release", path: "generate", when: (s) => s === "held" },
    { name: "Run again", action: "rerun", path: "rerun", when: (s) => ENDED.has(s) },
  ];
  const VERBS = { stop: "stop", hold: "hold", release: "release", rerun: "run again" };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  function setText(node, text) {
    const value = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  // --- the API, with the token when there is one -------------------------------------------

  let token = sessionStorage.getItem(TOKEN_KEY);
  let asking = null;

  class ApiError extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || `the server answered ${status}`);
      this.status = status;
      this.fields = error.fields || {};
    }
  }

  function askToken(refused) {
    if (!asking) {
      asking = new Promise((resolve) => {
        const dialog = $("login");
        setText($("login-error"), refused ? "That token was refused." : "");
        $("login-form").onsubmit = (event) => {
          event.preventDefault();
          token = $("login-token").value.trim();
          sessionStorage.setItem(TOKEN_KEY, token);
          $("sign-out").hidden = false;
          dialog.close();
          asking = null;
          resolve();
        };
        dialog.oncancel = (event) => event.preventDefault(); // nothing works without it
        if (!dialog.open) dialog.showModal();
        $("login-token").focus();
      });
    }
    return asking;
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (token) headers.set("Authorization", "Bearer " + token);
    let body = options.body;
    if (options.json !== undefined) {
      headers.set("Content-Type", "application/json");
      body = JSON.stringify(options.json);
    }
    const response = await fetch(path, { method: options.method || "GET", headers, body, cache: "no-store" });
    if (response.status === 401) {
      await askToken(Boolean(token));
      return api(path, options);
    }
    if (!response.ok && !(options.accept || []).includes(response.status)) {
      let detail = null;
      try { detail = await response.json(); } catch (_) { /* not JSON */ }
      throw new ApiError(response.status, detail);
    }
    return response;
  }

  // --- notices ------------------------------------------------------------------------------

  function notify(text, isError) {
    const box = $("notice");
    box.replaceChildren(el("span", { class: isError ? "error" : "", text }));
    box.setAttribute("role", isError ? "alert" : "status");
  }

  // --- the jobs: every job in memory, only the visible rows in the page ---------------------

  const jobs = new Map();
  let shown = [];
  const selected = new Set();
  const filter = { states: new Set(), type: "", query: "" };
  let orderDirty = true;
  let frame = 0;
  const rendered = new Map(); // id -> row element now in the page
  let rowHeight = 36;
  let firstRowsMarked = false;

  const when = (text) => (text ? Date.parse(text) : null); // milliseconds, as the listing's

  function jobOfSidecar(s) {
    return {
      id: s.id, name: s.name, state: s.state, progress: s.progress, type: s.type, node: s.node,
      attempt: s.attempt, created: when(s.created_at), started: when(s.started_at),
      finished: when(s.finished_at), updated: when(s.updated_at), message: s.message,
      error: s.error ? s.error.message : null,
    };
  }

  // Events come in the order the sidecars changed: the latest always wins.
  // A job's object is updated in place: the shown list holds the same objects.
  function put(job) {
    const old = jobs.get(job.id);
    if (!old || old.created !== job.created || old.state !== job.state || old.type !== job.type
        || old.name !== job.name) orderDirty = true;
    if (old) Object.assign(old, job);
    else jobs.set(job.id, job);
  }

  function matches(job) {
    if (filter.states.size && !filter.states.has(job.state)) return false;
    if (filter.type && job.type !== filter.type) return false;
    if (filter.query) {
      const q = filter.query;
      if (!job.id.toLowerCase().includes(q) && !(job.name || "").toLowerCase().includes(q)) return false;
    }
    return true;
  }

  function reorder() {
    shown = [];
    for (const job of jobs.values()) if (matches(job)) shown.push(job);
    shown.sort((a, b) => (b.created - a.created) || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0));
    orderDirty = false;
    renderCounts();
    renderPlugins();
  }

  function schedule() {
    if (!frame) frame = requestAnimationFrame(() => { frame = 0; render(); });
  }

  function render() {
    if (orderDirty) reorder();
    else renderCounts();
    renderRows();
    if (openId && jobs.has(openId)) renderJobActions(jobs.get(openId));
  }

  let lastCounts = "";
  function renderCounts() {
    const counts = Object.fromEntries(STATES.map((s) => [s, 0]));
    for (const job of jobs.values()) counts[job.state] = (counts[job.state] || 0) + 1;
    const key = JSON.stringify(counts) + [...filter.states].join();
    if (key === lastCounts) return;
    lastCounts = key;
    const box = $("counts");
    box.replaceChildren(el("button", { type: "button", "aria-pressed": String(!filter.states.size), "data-state": "" },
      `all ${jobs.size}`));
    for (const state of STATES) {
      box.append(el("button", {
        type: "button", class: "s-" + state, "aria-pressed": String(filter.states.has(state)), "data-state": state,
      }, `${state} ${counts[state]}`));
    }
  }

  let knownPlugins = "";
  function renderPlugins() {
    const types = new Set();
    for (const job of jobs.values()) if (job.type) types.add(job.type);
    const list = [...types].sort();
    if (list.join("\n") === knownPlugins) return;
    knownPlugins = list.join("\n");
    const select = $("plugin-filter");
    select.replaceChildren(el("option", { value: "" }, "all"), ...list.map((t) => el("option", { value: t }, t)));
    select.value = filter.type;
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
    seconds = Math.max(0, seconds);
    if (seconds < 60) return `${Math.floor(seconds)}s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)}m`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ${Math.floor((seconds % 3600) / 60)}m`;
    return `${Math.floor(seconds / 86400)}d`;
  }

  function makeRow() {
    const row = el("div", { class: "row", role: "row" });
    const cell = (cls, ...children) => el("span", { role: "cell", class: cls }, ...children);
    row.append(
      cell("c-sel", el("input", { type: "checkbox" })),
      cell("c-id", el("a")),
      cell("c-name"),
      cell("c-state", el("span", { class: "state" })),
      cell("c-prog", el("progress", { max: "100", value: "0" }), el("span", { class: "pct" })),
      cell("c-type"), cell("c-node"), cell("c-att"), cell("c-age"), cell("c-dur"), cell("c-msg"),
      cell("c-act", ...ACTIONS.map((a) => el("button", { type: "button", "data-action": a.action }, a.name))),
    );
    return row;
  }

  function fillRow(row, job, index) {
    const c = row.children;
    if (row.dataset.jobId !== job.id) {
      row.dataset.jobId = job.id;
      c[0].firstChild.setAttribute("aria-label", `Select job ${job.id}`);
      c[1].firstChild.href = "#/job/" + encodeURIComponent(job.id);
      c[4].firstChild.setAttribute("aria-label", `Progress of job ${job.id}`);
    }
    row.setAttribute("aria-rowindex", String(index + 2));
    const isSelected = selected.has(job.id);
    c[0].firstChild.checked = isSelected;
    row.classList.toggle("selected", isSelected);
    setText(c[1].firstChild, job.id);
    setText(c[2], job.name);
    c[2].title = job.name || "";
    const state = c[3].firstChild;
    setText(state, job.state);
    state.className = "state s-" + job.state;
    const progress = c[4].firstChild;
    const percent = Math.round(job.progress || 0);
    if (progress.value !== percent) progress.value = percent;
    setText(c[4].lastChild, percent + "%");
    setText(c[5], job.type);
    setText(c[6], job.node);
    setText(c[7], job.attempt);
    const now = Date.now();
    setText(c[8], age((now - job.created) / 1000));
    setText(c[9], job.started ? age(((job.finished || now) - job.started) / 1000) : "");
    const message = job.error || job.message || "";
    setText(c[10], message);
    c[10].title = message;
    c[10].classList.toggle("error", Boolean(job.error));
    ACTIONS.forEach((a, i) => { c[11].children[i].disabled = !a.when(job.state); });
  }

  function renderRows() {
    const scroller = $("scroller");
    const top = scroller.scrollTop;
    const height = scroller.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / rowHeight) - 5);
    const last = Math.min(shown.length, Math.ceil((top + height) / rowHeight) + 5);
    $("spacer").style.height = shown.length * rowHeight + "px";
    const win = $("window");
    win.style.transform = `translateY(${first * rowHeight}px)`;
    const keep = new Map();
    let at = 0;
    for (let i = first; i < last; i++) {
      const job = shown[i];
      const row = rendered.get(job.id) || makeRow();
      fillRow(row, job, i);
      keep.set(job.id, row);
      if (win.children[at] !== row) win.insertBefore(row, win.children[at] || null);
      at++;
    }
    while (win.children.length > at) win.lastElementChild.remove();
    rendered.clear();
    for (const [id, row] of keep) rendered.set(id, row);
    $("table").setAttribute("aria-rowcount", String(shown.length + 1));
    $("empty").hidden = shown.length > 0;
    setText($("shown"), partOf ? `the newest ${jobs.size} of ${partOf} jobs (the rest on the way)`
      : shown.length === jobs.size ? `${jobs.size} job${jobs.size === 1 ? "" : "s"}`
        : `${shown.length} of ${jobs.size} jobs shown`);
    const all = $("select-all");
    all.checked = shown.length > 0 && shown.every((job) => selected.has(job.id));
    renderBulk();
    if (!firstRowsMarked && jobsLoaded) {
      firstRowsMarked = true;
      performance.mark("kinod:first-rows");
      document.body.dataset.ready = "true";
    }
  }

  function measureRows() {
    const value = parseFloat(getComputedStyle(document.documentElement).getPropertyValue("--row-h"));
    if (value && value !== rowHeight) { rowHeight = value; schedule(); }
  }

  // --- loading and following ---------------------------------------------------------------

  let jobsLoaded = false;
  let sinceSnapshot = null;

  function rowsOf(body) {
    const rows = new Map();
    for (const values of body.rows) {
      const job = {};
      body.columns.forEach((name, i) => { job[name] = values[i]; });
      rows.set(job.id, job);
    }
    return rows;
  }

  let partOf = 0; // while only the newest jobs are in: how many there are in all

  async function loadJobs() {
    sinceSnapshot = new Set();
    if (!jobsLoaded) { // the newest first, for a first paint that waits on nothing else
      const body = await (await api(API + "/dashboard/jobs?newest=200")).json();
      for (const job of rowsOf(body).values()) if (!sinceSnapshot.has(job.id)) put(job);
      partOf = body.rows.length < body.total ? body.total : 0;
      jobsLoaded = true;
      render();
    }
    const fresh = rowsOf(await (await api(API + "/dashboard/jobs")).json());
    // What an event brought while the listing was on its way is newer than the listing.
    for (const id of sinceSnapshot) if (jobs.has(id)) fresh.set(id, jobs.get(id));
    for (const [id, job] of fresh) {
      const old = jobs.get(id);
      if (old) Object.assign(old, job); else jobs.set(id, job);
    }
    for (const id of [...jobs.keys()]) if (!fresh.has(id)) jobs.delete(id); // pruned
    sinceSnapshot = null;
    partOf = 0;
    orderDirty = true;
    render();
  }

  let loading = null;
  function reload() {
    if (!loading) {
      loading = loadJobs().catch((error) => notify(`Cannot load the jobs: ${error.message}`, true))
        .finally(() => { loading = null; });
    }
    return loading;
  }

  let events = null;
  let resync = false;

  async function follow() {
    let url = API + "/events";
    try {
      const ticket = await (await api(API + "/events/ticket", { method: "POST" })).json();
      url += "?ticket=" + encodeURIComponent(ticket.ticket);
    } catch (error) {
      setLive(false, "not live: " + error.message);
      setTimeout(follow, 3000);
      return;
    }
    events = new EventSource(url);
    events.addEventListener("task", (event) => {
      const sidecar = JSON.parse(event.data);
      if (sinceSnapshot) sinceSnapshot.add(sidecar.id);
      put(jobOfSidecar(sidecar));
      schedule();
      if (sidecar.id === openId) showJob(sidecar);
    });
    // The listing is asked for once the stream is open, so no change falls between them.
    events.onopen = () => {
      setLive(true);
      if (resync || !jobsLoaded) { resync = false; reload(); }
    };
    events.onerror = () => {
      setLive(false, "reconnecting…");
      resync = true;
      if (events.readyState === EventSource.CLOSED) { // refused (a ticket ran out): a new one
        events.close();
        setTimeout(follow, 1000);
      }
    };
  }

  function setLive(on, text) {
    const live = $("live");
    live.classList.toggle("on", on);
    setText(live, on ? "live" : text);
  }

  // --- actions -------------------------------------------------------------------------------

  async function act(id, action) {
    const spec = ACTIONS.find((a) => a.action === action);
    try {
      const response = await api(`${TASKS}/${encodeURIComponent(id)}/${spec.path}`, { method: "POST" });
      const body = await response.json();
      notify(action === "rerun" ? `Job ${id}: running again (attempt 1 of a new run).`
        : `Job ${id}: ${VERBS[action]} asked${body.state ? ` (it was ${body.state})` : ""}.`);
    } catch (error) {
      notify(`Job ${id}: cannot ${VERBS[action]}: ${error.message}`, true);
    }
  }

  function confirmWith(text) {
    return new Promise((resolve) => {
      const dialog = $("confirm");
      setText($("confirm-text"), text);
      const done = (answer) => { dialog.close(); resolve(answer); };
      $("confirm-ok").onclick = () => done(true);
      $("confirm-cancel").onclick = () => done(false);
      dialog.oncancel = () => resolve(false);
      dialog.showModal();
      $("confirm-cancel").focus();
    });
  }

  async function bulk(action) {
    const ids = [...selected];
    if (!ids.length) return;
    const label = ACTIONS.find((a) => a.action === action).name;
    const what = ids.length === 1 ? `job ${ids[0]}` : `${ids.length} jobs`;
    if (!(await confirmWith(`${label}: ${what}?`))) return;
    try {
      const result = await (await api(API + "/dashboard/actions", { method: "POST", json: { action, ids } })).json();
      const refused = result.results.filter((r) => !r.ok);
      const detail = refused.slice(0, 5).map((r) => `${r.id}: ${r.message}`).join("; ");
      notify(`${label}: ${result.done} done` + (refused.length ? `, ${refused.length} refused (${detail}${refused.length > 5 ? "; …" : ""})` : "") + ".",
        refused.length > 0);
    } catch (error) {
      notify(`${label}: ${error.message}`, true);
    }
  }

  function renderBulk() {
    $("bulk").hidden = selected.size === 0;
    setText($("bulk-count"), `${selected.size} selected`);
  }

  // --- one job's view ---------------------------------------------------------------------

  let openId = null;
  let logTimer = 0;
  let outputsAt = 0;
  let outputsKey = "";
  let blobs = [];

  function fact(list, name, value) {
    if (value === null || value === undefined || value === "") return;
    list.append(el("dt", {}, name), el("dd", {}, String(value)));
  }

  const stamp = (text) => (text ? new Date(text).toLocaleString() : null);

  function renderJobActions(job) {
    const box = $("job-actions");
    if (box.dataset.for !== job.id) {
      box.dataset.for = job.id;
      box.replaceChildren(...ACTIONS.map((a) => el("button", { type: "button", "data-action": a.action }, a.name)));
    }
    ACTIONS.forEach((a, i) => { box.children[i].disabled = !a.when(job.state); });
  }

  function showJob(s) {
    renderJobActions(jobOfSidecar(s));
    const facts = $("job-facts");
    facts.replaceChildren();
    fact(facts, "Name", s.name);
    fact(facts, "State", s.state);
    fact(facts, "Progress", `${Math.round(s.progress)}%`);
    fact(facts, "Message", s.message);
    fact(facts, "Plugin", s.type);
    fact(facts, "Node", s.node);
    fact(facts, "Attempt", s.attempt);
    fact(facts, "Created", stamp(s.created_at));
    fact(facts, "Started", stamp(s.started_at));
    fact(facts, "Finished", stamp(s.finished_at));
    $("job-error-box").hidden = !s.error;
    setText($("job-error"), s.error ? `${s.error.code}: ${s.error.message}` : "");
    setText($("job-params"), JSON.stringify(s.task && s.task.data !== undefined ? s.task.data : s.task, null, 2));
    $("job-result-box").hidden = !s.result;
    setText($("job-result"), s.result ? JSON.stringify(s.result, null, 2) : "");
    const running = !ENDED.has(s.state);
    setText($("job-log-follow"), running ? "(following)" : "");
    const key = `${s.state}|${s.attempt}|${s.created_at}`;
    const now = Date.now();
    if (key !== outputsKey || (running && now - outputsAt > 2000)) {
      outputsKey = key;
      outputsAt = now;
      loadOutputs(s.id, running).catch(() => {});
    }
    if (!logTimer) followLog(s.id);
  }

  async function openJob(id) {
    if (openId !== id) {
      closeJob();
      openId = id;
      setText($("job-title"), `Job ${id}`);
      $("job-facts").replaceChildren();
      $("job-outputs").replaceChildren();
      setText($("job-log"), "");
      setText($("job-params"), "");
    }
    $("job").hidden = false;
    $("job-title").focus();
    try {
      const sidecar = await (await api(`${TASKS}/${encodeURIComponent(id)}`)).json();
      if (openId === id) showJob(sidecar);
    } catch (error) {
      if (openId === id) notify(`Job ${id}: ${error.message}`, true);
    }
  }

  function closeJob() {
    openId = null;
    outputsKey = "";
    previewKey = "";
    $("job-preview").hidden = true;
    clearTimeout(logTimer);
    logTimer = 0;
    $("job").hidden = true;
    delete $("job-actions").dataset.for;
    for (const url of blobs) URL.revokeObjectURL(url);
    blobs = [];
  }

  async function followLog(id) {
    logTimer = -1;
    try {
      const response = await api(`${TASKS}/${encodeURIComponent(id)}/log`, {
        headers: { Range: `bytes=-${LOG_TAIL_BYTES}` }, accept: [404, 416],
      });
      if (openId !== id) return;
      const pre = $("job-log");
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      let text = response.ok ? await response.text() : "";
      if (response.status === 206) text = "…" + text.slice(text.indexOf("\n") + 1);
      setText(pre, response.status === 404 ? "(no log yet)" : text);
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    } catch (error) {
      if (openId !== id) return;
    }
    const job = jobs.get(id);
    const running = !job || !ENDED.has(job.state);
    logTimer = running && openId === id ? setTimeout(() => followLog(id), 1000) : 0;
  }

  async function blobUrl(path) {
    const response = await api(path);
    const url = URL.createObjectURL(await response.blob());
    blobs.push(url);
    return url;
  }

  async function loadOutputs(id, running = false) {
    const response = await api(`${TASKS}/${encodeURIComponent(id)}/outputs`, { accept: [404] });
    if (openId !== id) return;
    const list = $("job-outputs");
    const outputs = response.ok ? await response.json() : [];
    showPreview(id, outputs, running);
    if (!outputs.length) { list.replaceChildren(el("li", { class: "muted" }, "none yet")); return; }
    const base = `${TASKS}/${encodeURIComponent(id)}`;
    const items = [];
    for (const output of outputs.slice(0, MAX_OUTPUTS_SHOWN)) {
      const path = output.path.split("/").map(encodeURIComponent).join("/");
      if (IMAGE.test(output.path)) {
        const img = el("img", { alt: output.path, loading: "lazy" });
        const button = el("button", { type: "button", class: "thumb", title: output.path }, img, el("span", {}, output.path));
        button.addEventListener("click", () => openImage(`${base}/outputs/${path}`, output.path));
        blobUrl(`${base}/thumbnails/${path}?size=256&v=${output.modified_at}`)
          .then((url) => { img.src = url; })
          .catch(() => { img.alt = `${output.path} (no thumbnail)`; });
        items.push(el("li", {}, button));
      } else {
        const button = el("button", { type: "button" }, `${output.path} (${output.size} bytes)`);
        button.addEventListener("click", () => download(`${base}/outputs/${path}`, output.path));
        items.push(el("li", {}, button));
      }
    }
    if (outputs.length > MAX_OUTPUTS_SHOWN) items.push(el("li", { class: "muted" }, `and ${outputs.length - MAX_OUTPUTS_SHOWN} more`));
    list.replaceChildren(...items);
  }

  // While a job runs, its newest image (a render's last frame) is shown large.
  let previewKey = "";

  function showPreview(id, outputs, running) {
    const images = running ? outputs.filter((o) => IMAGE.test(o.path)) : [];
    const box = $("job-preview");
    if (!images.length) { box.hidden = true; previewKey = ""; return; }
    const newest = images.reduce((a, b) => (b.modified_at > a.modified_at ? b : a));
    const key = `${id}|${newest.path}|${newest.modified_at}`;
    if (key === previewKey) return;
    previewKey = key;
    const path = newest.path.split("/").map(encodeURIComponent).join("/");
    blobUrl(`${TASKS}/${encodeURIComponent(id)}/thumbnails/${path}?size=512&v=${newest.modified_at}`)
      .then((url) => {
        if (openId !== id || previewKey !== key) return;
        $("job-preview-img").src = url;
        $("job-preview-img").alt = newest.path;
        setText($("job-preview-name"), newest.path);
        box.hidden = false;
      })
      .catch(() => {});
  }

  async function openImage(path, name) {
    try {
      $("viewer-img").src = await blobUrl(path);
      $("viewer-img").alt = name;
      setText($("viewer-name"), name);
      $("viewer").showModal();
      $("viewer-close").focus();
    } catch (error) {
      notify(`${name}: ${error.message}`, true);
    }
  }

  async function download(path, name) {
    try {
      const link = el("a", { href: await blobUrl(path), download: name.split("/").pop() });
      document.body.append(link);
      link.click();
      link.remove();
    } catch (error) {
      notify(`${name}: ${error.message}`, true);
    }
  }

  // --- nodes and pausing -----------------------------------------------------------------

  let farmPaused = null;

  async function loadNodes() {
    let view;
    try {
      view = await (await api(API + "/nodes")).json();
    } catch (error) {
      setText($("farm-state"), "farm: unknown");
      return;
    }
    farmPaused = view.paused;
    const state = $("farm-state");
    setText(state, view.paused ? "farm paused" : "farm running");
    state.className = view.paused ? "paused" : "";
    const toggle = $("farm-toggle");
    toggle.hidden = false;
    setText(toggle, view.paused ? "Resume farm" : "Pause farm");
    setText($("nodes-farm"), view.paused ? "The farm is paused: no node starts a new job; running jobs go on."
      : "The farm is running.");
    const rows = view.nodes.map((n) => {
      const silent = !n.stopped && n.heartbeat_age_s > n.lease;
      const words = n.stopped ? "stopped" : n.paused ? "paused" : silent ? "silent" : "up";
      const button = n.stopped ? "" : el("button", {
        type: "button", "data-node": n.node, "data-pause": n.paused ? "resume" : "pause",
      }, n.paused ? "Resume node" : "Pause node");
      return el("tr", {},
        el("td", {}, n.node), el("td", {}, n.host), el("td", {}, `${age(n.heartbeat_age_s)} ago`),
        el("td", {}, `${n.running} of ${n.workers}`), el("td", {}, String(n.queued)),
        el("td", {}, n.serves.join(", ")), el("td", { class: n.paused || silent ? "paused" : "" }, words),
        el("td", {}, button));
    });
    $("nodes-body").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "8", class: "muted" }, "No node has sent a heartbeat."))]));
  }

  async function setPause(node, what) {
    const path = node ? `${API}/nodes/${encodeURIComponent(node)}/${what}` : `${API}/farm/${what}`;
    try {
      await api(path, { method: "POST" });
      notify(`${node ? "Node " + node : "The farm"}: ${what === "pause" ? "paused" : "resumed"}.`);
    } catch (error) {
      notify(`Cannot ${what}: ${error.message}`, true);
    }
    loadNodes();
  }

  // --- the new job form -----------------------------------------------------------------

  let plugins = null;

  async function loadPlugins() {
    if (plugins) return;
    plugins = await (await api(TASKS.replace("/tasks", "/plugins"))).json();
    const select = $("new-plugin");
    select.replaceChildren(...plugins.map((p) => el("option", { value: p.name }, p.name)));
    buildParams();
  }

  function fieldFor(name, spec) {
    const id = "f-data." + name;
    const attrs = { id, name: "data." + name, "data-param": name, "data-kind": spec.type || "string" };
    if (spec.required) attrs.required = true;
    let input;
    const hasDefault = spec.default !== undefined && spec.default !== null;
    if (Array.isArray(spec.enum)) {
      input = el("select", attrs);
      if (!spec.required || !hasDefault) input.append(el("option", { value: "" }, ""));
      for (const choice of spec.enum) input.append(el("option", { value: JSON.stringify(choice) }, String(choice)));
      if (hasDefault) input.value = JSON.stringify(spec.default);
      input.dataset.kind = "enum";
    } else if (spec.type === "boolean") {
      input = el("input", { ...attrs, type: "checkbox" });
      input.checked = spec.default === true;
    } else if (spec.type === "integer" || spec.type === "number" || spec.type === "float") {
      input = el("input", { ...attrs, type: "number", step: spec.type === "integer" ? "1" : "any",
        min: spec.minimum, max: spec.maximum });
      if (hasDefault) input.value = String(spec.default);
    } else if (spec.type === "array" || spec.type === "object" || spec.type === "dict" || spec.type === "list") {
      input = el("textarea", { ...attrs, placeholder: spec.type === "object" ? "{ JSON }" : "[ JSON ]" });
      if (hasDefault) input.value = JSON.stringify(spec.default);
    } else if (/prompt/i.test(name)) {
      input = el("textarea", attrs);
      if (hasDefault) input.value = String(spec.default);
    } else {
      input = el("input", { ...attrs, type: "text" });
      if (hasDefault) input.value = String(spec.default);
    }
    const bounds = [spec.minimum !== undefined ? `min ${spec.minimum}` : "", spec.maximum !== undefined ? `max ${spec.maximum}` : ""].filter(Boolean).join(", ");
    const hint = [spec.description, spec.type, bounds].filter(Boolean).join(" · ");
    input.setAttribute("aria-describedby", `hint-data.${name} err-data.${name}`);
    const label = el("label", { for: id }, name, spec.required ? " *" : "");
    const wrap = el("div", { class: spec.type === "boolean" ? "field" : "field" }, label, input,
      el("small", { class: "hint", id: `hint-data.${name}` }, hint),
      el("small", { class: "field-error", id: `err-data.${name}` }));
    return wrap;
  }

  function buildParams() {
    const plugin = plugins.find((p) => p.name === $("new-plugin").value);
    const box = $("new-params");
    box.replaceChildren(el("legend", {}, "Parameters"));
    setText($("new-plugin-hint"), plugin ? plugin.description || "" : "");
    const params = (plugin && plugin.parameters) || {};
    for (const [name, spec] of Object.entries(params)) box.append(fieldFor(name, spec || {}));
    clearErrors();
  }

  function clearErrors() {
    for (const node of document.querySelectorAll("#new-form .field-error")) setText(node, "");
    for (const node of document.querySelectorAll("#new-form [aria-invalid]")) node.removeAttribute("aria-invalid");
    setText($("new-error"), "");
  }

  function showFieldErrors(fields, message) {
    const unplaced = [];
    let first = null;
    for (const [field, problem] of Object.entries(fields)) {
      const box = $("err-" + field);
      const input = $("f-" + field) || (field === "type" ? $("new-plugin") : null);
      if (box) {
        setText(box, problem);
        if (input) { input.setAttribute("aria-invalid", "true"); first = first || input; }
      } else {
        unplaced.push(`${field}: ${problem}`);
      }
    }
    setText($("new-error"), unplaced.length ? unplaced.join("\n") : (Object.keys(fields).length ? "" : message));
    if (first) first.focus();
  }

  function readForm() {
    const task = { type: $("new-plugin").value, data: {} };
    const localErrors = {};
    const name = $("f-name").value.trim();
    if (name) task.name = name;
    const id = $("f-id").value.trim();
    if (id) task.id = id;
    const priority = $("f-priority").value.trim();
    if (priority) task.priority = Number.isFinite(Number(priority)) ? Number(priority) : priority;
    task.start = $("f-start").checked;
    for (const input of document.querySelectorAll("#new-params [data-param]")) {
      const key = input.dataset.param;
      const kind = input.dataset.kind;
      if (kind === "boolean") { task.data[key] = input.checked; continue; }
      const raw = input.value;
      if (raw.trim() === "") continue; // the plugin's default, or its "required"
      if (kind === "enum") task.data[key] = JSON.parse(raw);
      else if (kind === "integer" || kind === "number" || kind === "float") {
        task.data[key] = Number.isFinite(Number(raw)) ? Number(raw) : raw;
      } else if (["array", "object", "dict", "list"].includes(kind)) {
        try { task.data[key] = JSON.parse(raw); } catch (_) { localErrors["data." + key] = "not valid JSON"; }
      } else task.data[key] = raw;
    }
    return { task, localErrors };
  }

  async function submitJob(event) {
    event.preventDefault();
    clearErrors();
    const { task, localErrors } = readForm();
    if (Object.keys(localErrors).length) { showFieldErrors(localErrors); return; }
    try {
      const created = await (await api(TASKS, { method: "POST", json: task })).json();
      const link = el("a", { href: "#/job/" + encodeURIComponent(created.id) }, `job ${created.id}`);
      $("notice").replaceChildren(el("span", {}, "Submitted "), link, el("span", {}, ` (${created.state}).`));
      $("f-id").value = "";
    } catch (error) {
      if (error instanceof ApiError) showFieldErrors(error.fields, error.message);
      else setText($("new-error"), error.message);
    }
  }

  // --- routes: #/jobs, #/job/<id>, #/nodes, #/new ------------------------------------------

  function route() {
    const hash = location.hash || "#/jobs";
    const jobMatch = /^#\/job\/(.+)$/.exec(hash);
    const view = jobMatch ? "jobs" : hash === "#/nodes" ? "nodes" : hash === "#/new" ? "new" : "jobs";
    $("view-jobs").hidden = view !== "jobs";
    $("view-nodes").hidden = view !== "nodes";
    $("view-new").hidden = view !== "new";
    for (const link of document.querySelectorAll("nav a")) {
      if (link.dataset.view === view) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    if (jobMatch) openJob(decodeURIComponent(jobMatch[1]));
    else if (openId !== null) closeJob();
    if (view === "nodes") loadNodes();
    if (view === "new") loadPlugins().catch((error) => notify(error.message, true));
    if (view === "jobs") schedule();
  }

  // --- wiring ---------------------------------------------------------------------------------

  function onRowClick(event) {
    const target = event.target;
    const row = target.closest("[data-job-id]");
    if (!row) return;
    const id = row.dataset.jobId;
    if (target.matches("input[type=checkbox]")) {
      if (target.checked) selected.add(id); else selected.delete(id);
      row.classList.toggle("selected", target.checked);
      renderRows();
    } else if (target.matches("button[data-action]")) {
      act(id, target.dataset.action);
    }
  }

  function start() {
    if (token) $("sign-out").hidden = false;
    $("window").addEventListener("click", onRowClick);
    $("scroller").addEventListener("scroll", schedule, { passive: true });
    window.addEventListener("resize", () => { measureRows(); schedule(); });
    window.addEventListener("hashchange", route);
    $("counts").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-state]");
      if (!button) return;
      const state = button.dataset.state;
      if (!state) filter.states.clear();
      else if (filter.states.has(state)) filter.states.delete(state);
      else filter.states.add(state);
      orderDirty = true;
      lastCounts = "";
      schedule();
    });
    $("search").addEventListener("input", (event) => {
      filter.query = event.target.value.trim().toLowerCase();
      orderDirty = true;
      schedule();
    });
    $("plugin-filter").addEventListener("change", (event) => {
      filter.type = event.target.value;
      orderDirty = true;
      schedule();
    });
    $("select-all").addEventListener("change", (event) => {
      for (const job of shown) if (event.target.checked) selected.add(job.id); else selected.delete(job.id);
      schedule();
    });
    $("bulk").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-bulk]");
      if (button) bulk(button.dataset.bulk);
    });
    $("bulk-clear").addEventListener("click", () => { selected.clear(); schedule(); });
    $("job-actions").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-action]");
      if (button && openId) act(openId, button.dataset.action);
    });
    $("farm-toggle").addEventListener("click", () => setPause(null, farmPaused ? "resume" : "pause"));
    $("nodes-body").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-node]");
      if (button) setPause(button.dataset.node, button.dataset.pause);
    });
    $("new-plugin").addEventListener("change", buildParams);
    $("new-form").addEventListener("submit", submitJob);
    $("viewer-close").addEventListener("click", () => $("viewer").close());
    $("sign-out").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      location.reload();
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && openId && !document.querySelector("dialog[open]")) location.hash = "#/jobs";
    });
    measureRows();
    route();
    follow();
    setTimeout(() => { if (!jobsLoaded) reload(); }, 3000); // no stream: the jobs still show
    loadNodes();
    setInterval(() => { if (!document.hidden) renderRows(); }, 1000); // ages and durations
    setInterval(() => { if (!document.hidden) loadNodes(); }, 5000);
  }

  start();
})();
