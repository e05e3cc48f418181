// andon's job dashboard: plain JavaScript, no dependencies, no build step.
// Data comes from /api with fetch(); the bearer token travels in the Authorization header only.
// The DOM is built from text (textContent), never from HTML strings, so job data can't inject markup.
"use strict";

const ROOT = document.querySelector('meta[name="andon-root"]').content;
const TOKEN_KEY = "andon.token";
const STATUSES = ["pending", "running", "cancelling", "cancelled", "completed", "failed"];
const REASONS = ["user_requested", "timeout", "system_shutdown", "resource_limit", "dependency_failed"];
const UNFINISHED = ["pending", "running", "cancelling"];
const PAGE_SIZE = 50;

// ---------------------------------------------------------------------------------------------
// Small DOM helpers

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;  // CSSOM: allowed by the page's CSP, unlike a style attribute
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const $ = (id) => document.getElementById(id);

function shortId(id) { return id ? id.slice(0, 8) : ""; }

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  const today = new Date().toDateString() === d.toDateString();
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  return today ? time : `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${time}`;
}

function ms(value) {
  if (value === null || value === undefined) return "";
  return value < 10 ? `${value.toFixed(1)} ms` : value < 10000 ? `${Math.round(value)} ms` : `${(value / 1000).toFixed(1)} s`;
}

function jsonText(value, max) {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return max && text.length > max ? text.slice(0, max - 1) + "…" : text;
}

function badge(status) { return h("span", { class: `badge s-${status}` }, status); }

function progressBar(job, stage) {
  const total = job.total_items || 0;
  const done = job.completed_items || 0;
  const failed = job.failed_items || 0;
  const pct = (n) => (total ? (100 * n) / total : 0);
  const label = `${done}/${total}` + (failed ? ` · ${failed} failed` : "") + (stage ? ` · ${stage}` : "");
  return h("div", { class: "progress", title: label },
    h("div", { class: "bar" },
      h("span", { class: "done", style: `width:${pct(done)}%` }),
      h("span", { class: "failed", style: `width:${pct(failed)}%` })),
    h("span", { class: "label" }, label));
}

let bannerTimer = null;
function say(text, kind = "ok") {
  const banner = $("banner");
  banner.textContent = text;
  banner.className = `banner ${kind}`;
  banner.hidden = false;
  clearTimeout(bannerTimer);
  bannerTimer = setTimeout(() => { banner.hidden = true; }, kind === "error" ? 15000 : 8000);
}

// ---------------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : JSON.stringify(detail));
    this.status = status;
  }
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, { method = "GET", body, query } = {}) {
  const url = new URL(ROOT + path, location.origin);
  for (const [key, value] of Object.entries(query || {})) if (value !== "" && value != null) url.searchParams.set(key, value);
  const headers = { Accept: "application/json", ...authHeaders() };
  const init = { method, headers, credentials: "omit", cache: "no-store" };
  if (method !== "GET") {  // every write is JSON: the API refuses a browser POST that isn't (no CSRF by form)
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body || {});
  }
  const response = await fetch(url, init);
  if (response.status === 401) {
    await askToken("The API answered 401: give a token that may do this.");
    return api(path, { method, body, query });
  }
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    const detail = data && data.detail !== undefined ? data.detail : response.statusText;
    throw new ApiError(response.status, Array.isArray(detail) ? detail.map((d) => d.msg).join("; ") : detail);
  }
  return { data, response };
}

// Server-Sent Events over fetch(): an EventSource can't send the Authorization header.
async function readEvents(path, onEvent, signal) {
  const response = await fetch(ROOT + path, { headers: { Accept: "text/event-stream", ...authHeaders() },
    credentials: "omit", cache: "no-store", signal });
  if (!response.ok) throw new ApiError(response.status, response.statusText);  // 401: the views ask for a token
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(event, JSON.parse(data.join("\n")));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The token: asked for when the API says 401, kept for this tab only

let tokenWaiters = [];
function askToken(why) {
  const dialog = $("token-dialog");
  $("token-error").hidden = !why;
  $("token-error").textContent = why || "";
  if (!dialog.open) {
    $("token-input").value = "";
    dialog.showModal();
  }
  return new Promise((resolve) => tokenWaiters.push(resolve));
}

function setupToken() {
  $("token-form").addEventListener("submit", () => {
    sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    const waiters = tokenWaiters;
    tokenWaiters = [];
    waiters.forEach((resolve) => resolve());
    feed.restart();
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token-input").value = "";
    $("token-error").hidden = false;
    $("token-error").textContent = "Token forgotten.";
  });
  $("token-button").addEventListener("click", () => askToken(""));
}

// ---------------------------------------------------------------------------------------------
// The live feed: one GET /api/events for the whole page, reconnected with backoff

const feed = {
  controller: null,
  backoff: 1000,
  listener: null,  // the current view's (event, data) handler

  start() {
    this.controller = new AbortController();
    const { signal } = this.controller;
    readEvents("/api/events", (event, data) => {
      if (event === "open") {
        this.backoff = 1000;
        setLive(true);
      }
      if (this.listener) this.listener(event, data);
    }, signal).then(() => true, (err) => err.status !== 401).then((retry) => {
      setLive(false);  // a 401 waits for a token (restart()); anything else retries, backing off
      if (retry && !signal.aborted) setTimeout(() => { if (!signal.aborted) this.start(); }, this.backoff);
      this.backoff = Math.min(this.backoff * 2, 15000);
    });
  },

  restart() {
    if (this.controller) this.controller.abort();
    this.start();
  },
};

function setLive(on) {
  const live = $("live");
  live.textContent = on ? "live" : "offline";
  live.className = `live ${on ? "on" : "off"}`;
}

// ---------------------------------------------------------------------------------------------
// Cancel: one dialog for one job or for every job of a filter

function openCancel({ title, what, confirm, count, run }) {
  const dialog = $("cancel-dialog");
  $("cancel-title").textContent = title;
  $("cancel-what").textContent = what;
  $("cancel-confirm").textContent = confirm;
  $("cancel-confirm").disabled = count === 0;
  $("cancel-reason").value = "user_requested";
  $("cancel-message").value = "";
  $("cancel-error").hidden = true;
  const form = $("cancel-form");
  form.onsubmit = async (e) => {
    e.preventDefault();
    $("cancel-confirm").disabled = true;
    try {
      await run($("cancel-reason").value, $("cancel-message").value.trim() || null);
      dialog.close();
    } catch (err) {
      $("cancel-error").textContent = err.message;
      $("cancel-error").hidden = false;
    } finally {
      $("cancel-confirm").disabled = false;
    }
  };
  $("cancel-back").onclick = () => dialog.close();
  dialog.showModal();
}

function cancelJob(job, after) {
  openCancel({
    title: "Cancel job",
    what: `${job.job_id} · ${job.pipeline} · ${job.status}, ${job.completed_items}/${job.total_items} items done. ` +
      "Finished items are kept; the job stops at its next checkpoint.",
    confirm: "Cancel job",
    run: async (reason, message) => {
      const { data } = await api(`/api/jobs/${job.job_id}/cancel`, { method: "POST", body: { reason, message } });
      say(`Job ${shortId(job.job_id)}: ${data.message.toLowerCase()} (${reason}) — ${data.status}.`);
      if (after) after();
    },
  });
}

async function resumeJob(job, after) {
  try {
    const force = !job.resumable;
    const { data } = await api(`/api/jobs/${job.job_id}/resume`, { method: "POST", query: force ? { force: "true" } : {} });
    say(`Job ${shortId(job.job_id)} resumed as ${shortId(data.job_id)}.`);
    if (after) after(data);
  } catch (err) {
    say(`Resume of ${shortId(job.job_id)} failed: ${err.message}`, "error");
  }
}

function actionButtons(job, after) {
  const buttons = [];
  if (UNFINISHED.includes(job.status) && job.status !== "cancelling") {
    buttons.push(h("button", { type: "button", class: "small danger", onclick: () => cancelJob(job, after) }, "Cancel"));
  }
  if (job.status === "cancelled" && !job.resumed_by) {
    buttons.push(h("button", { type: "button", class: "small",
      title: job.resumable ? "runs every item not done" : `reason ${job.cancellation_reason}: resumed with force`,
      onclick: () => resumeJob(job, after) }, "Resume"));
  }
  return buttons;
}

// ---------------------------------------------------------------------------------------------
// Jobs view: /ui?status=&reason=&pipeline=&tag=&cursor=

function readFilter() {
  const q = new URLSearchParams(location.search);
  return { status: q.get("status") || "", reason: q.get("reason") || "", pipeline: q.get("pipeline") || "",
    tag: q.get("tag") || "", cursor: q.get("cursor") || "" };
}

function filterUrl(filter) {
  const q = new URLSearchParams();
  for (const key of ["status", "reason", "pipeline", "tag", "cursor"]) if (filter[key]) q.set(key, filter[key]);
  const text = q.toString();
  return `${ROOT}/ui${text ? "?" + text : ""}`;
}

function select(name, values, current, onchange) {
  return h("select", { name, "aria-label": name, onchange },
    h("option", { value: "" }, `any ${name}`),
    values.map((v) => h("option", { value: v, selected: v === current }, v)));
}

async function jobsView() {
  const signal = viewStreams.signal;
  const filter = readFilter();
  const rows = new Map();  // job_id -> { job, tr, stage }
  let pipelines = [];
  let nextCursor = null;
  let refreshTimer = null;
  const refetch = new Set();
  let refetchTimer = null;

  const go = (changes) => {
    const next = { ...filter, ...changes, cursor: changes.cursor || "" };
    history.pushState(null, "", filterUrl(next));
    route();
  };

  const tagInput = h("input", { name: "tag", placeholder: "tag", value: filter.tag, "aria-label": "tag",
    onchange: (e) => go({ tag: e.target.value.trim() }) });
  const pipelineSelect = select("pipeline", filter.pipeline ? [filter.pipeline] : [], filter.pipeline,
    (e) => go({ pipeline: e.target.value }));
  const bulkable = (filter.tag || UNFINISHED.includes(filter.status)) && !filter.pipeline && !filter.reason &&
    (!filter.status || UNFINISHED.includes(filter.status));
  const bulkButton = h("button", { type: "button", class: "danger", disabled: !bulkable,
    title: bulkable ? "cancel every unfinished job this filter matches" :
      "filter by tag and/or an unfinished status (pending, running, cancelling) to cancel in bulk",
    onclick: () => bulkCancel() }, "Cancel matching…");

  const tbody = h("tbody");
  const summary = h("span", { class: "muted" });
  const pager = h("div", { class: "pager" });
  const table = h("table", { class: "jobs" },
    h("thead", {}, h("tr", {}, ["Job", "Pipeline", "Status", "Progress", "Reason", "Source", "Tags", "Created",
      "Finished", "Cancel latency", ""].map((t) => h("th", {}, t)))),
    tbody);

  $("view").replaceChildren(
    h("section", { class: "toolbar" },
      h("h1", {}, "Jobs"),
      select("status", STATUSES, filter.status, (e) => go({ status: e.target.value })),
      select("reason", REASONS, filter.reason, (e) => go({ reason: e.target.value })),
      pipelineSelect, tagInput,
      (filter.status || filter.reason || filter.pipeline || filter.tag) ?
        h("a", { href: `${ROOT}/ui`, class: "clear", onclick: (e) => { e.preventDefault(); go({ status: "", reason: "", pipeline: "", tag: "" }); } }, "clear filters") : null,
      h("span", { class: "spacer" }),
      bulkButton),
    h("div", { class: "table-wrap" }, table),
    h("footer", { class: "list-foot" }, summary, pager));

  function row(job) {
    const entry = rows.get(job.job_id) || {};
    const latency = job.cancel_latency;
    const tr = h("tr", { dataset: { jobId: job.job_id, status: job.status } },
      h("td", {}, h("a", { href: `${ROOT}/ui/jobs/${job.job_id}`, class: "mono", title: job.job_id,
        onclick: (e) => { e.preventDefault(); history.pushState(null, "", `${ROOT}/ui/jobs/${job.job_id}`); route(); } },
      shortId(job.job_id)), job.resumed_from ? h("span", { class: "muted small", title: `resumes ${job.resumed_from}` }, " ↻") : null),
      h("td", {}, job.pipeline),
      h("td", { class: "status" }, badge(job.status)),
      h("td", {}, progressBar(job, job.status === "running" ? entry.stage : null)),
      h("td", { class: "reason", title: job.cancellation_message || "" }, job.cancellation_reason || ""),
      h("td", {}, job.cancellation_source || ""),
      h("td", {}, (job.tags || []).map((t) => h("span", { class: "chip" }, t))),
      h("td", { class: "time", title: job.created_at }, when(job.created_at)),
      h("td", { class: "time", title: job.finished_at || "" }, when(job.finished_at)),
      h("td", { class: "num", title: latency ? `requested → observed ${ms(latency.request_to_observe_ms)}; observed → stopped ${ms(latency.observe_to_stop_ms)}` : "" },
        latency ? ms(latency.request_to_observe_ms) : ""),
      h("td", { class: "actions" }, actionButtons(job, () => scheduleRefetch(job.job_id))));
    if (entry.tr) entry.tr.replaceWith(tr);
    rows.set(job.job_id, { ...entry, job, tr });
    return tr;
  }

  let loading = false;
  let dirty = false;  // something happened while a list was being read: read it again

  async function load() {
    loading = true;
    dirty = false;
    try {
      await show(await api("/api/jobs", { query: { ...filter, limit: PAGE_SIZE } }));
    } finally {
      loading = false;
      if (dirty) scheduleRefresh();
    }
  }

  async function show({ data, response }) {
    const link = response.headers.get("Link") || "";
    const match = link.match(/<([^>]+)>;\s*rel="next"/);
    nextCursor = match ? new URL(match[1], location.origin).searchParams.get("cursor") : null;
    const keep = new Map([...rows].map(([id, entry]) => [id, entry.stage]));
    rows.clear();
    tbody.replaceChildren(...data.map((job) => {
      if (keep.get(job.job_id)) rows.set(job.job_id, { stage: keep.get(job.job_id) });
      return row(job);
    }));
    if (!data.length) tbody.append(h("tr", {}, h("td", { colspan: 11, class: "empty" }, "No jobs match.")));
    summary.textContent = data.length ? `${data.length} job${data.length === 1 ? "" : "s"} on this page, newest first` : "";
    pager.replaceChildren(
      filter.cursor ? h("button", { type: "button", class: "ghost", onclick: () => history.back() }, "← Newer") : null,
      filter.cursor ? h("button", { type: "button", class: "ghost", onclick: () => go({}) }, "Newest") : null,
      nextCursor ? h("button", { type: "button", class: "ghost", onclick: () => go({ cursor: nextCursor }) }, "Older →") : null);
  }

  function scheduleRefresh() {  // a new job: list the page again (the server applies the filter)
    if (refreshTimer) return;
    refreshTimer = setTimeout(() => { refreshTimer = null; load().catch(() => {}); }, 300);
  }

  function scheduleRefetch(jobId) {  // a state change: read that job again for its exact fields
    refetch.add(jobId);
    if (refetchTimer) return;
    refetchTimer = setTimeout(async () => {
      refetchTimer = null;
      const ids = [...refetch];
      refetch.clear();
      if (ids.length > 10) return load().catch(() => {});
      for (const id of ids) {
        if (!rows.has(id)) continue;
        try { row((await api(`/api/jobs/${id}`)).data); } catch { /* gone or not visible: leave the row */ }
      }
    }, 200);
  }

  async function bulkCancel() {
    const status = UNFINISHED.includes(filter.status) ? filter.status : "";
    const { data } = await api("/api/jobs/count", { query: { status, tag: filter.tag, unfinished: "true" } });
    const n = data.count;
    const described = [status && `status ${status}`, filter.tag && `tag ${filter.tag}`].filter(Boolean).join(" and ");
    openCancel({
      title: "Cancel matching jobs",
      what: n ? `This cancels ${n} unfinished job${n === 1 ? "" : "s"} with ${described}. Queued ones never start; ` +
        "running ones stop at their next checkpoint and keep their finished items." :
        `No unfinished job has ${described}.`,
      confirm: `Cancel ${n} job${n === 1 ? "" : "s"}`,
      count: n,
      run: async (reason, message) => {
        const body = { reason, message };
        if (status) body.status = status;
        if (filter.tag) body.tag = filter.tag;
        const { data: out } = await api("/api/jobs/cancel", { method: "POST", body });
        say(`Bulk cancel (${reason}): ${out.matched} matched — ${out.cancelled} cancelled while queued, ` +
          `${out.cancelling} cancelling.`);
        load().catch(() => {});
      },
    });
  }

  feed.listener = (event, data) => {
    if (signal.aborted) return;
    if (event === "open") return scheduleRefresh();  // anything missed while the feed was away
    if (loading) { dirty = true; return; }
    const entry = rows.get(data.job_id);
    if (!entry) {
      if (!filter.cursor && (event === "submitted" || event === "resumed")) scheduleRefresh();
      return;
    }
    const job = { ...entry.job };
    if (event === "progress") {
      rows.set(data.job_id, { ...entry, stage: data.stage });
    } else {
      Object.assign(job, { status: data.job_status, completed_items: data.completed_items,
        failed_items: data.failed_items, total_items: data.total_items });
      if (event !== "item") scheduleRefetch(data.job_id);
    }
    row(job);
  };

  await load();
  api("/api/pipelines").then(({ data }) => {
    pipelines = data.map((p) => p.name);
    pipelineSelect.replaceWith(select("pipeline", pipelines, filter.pipeline, (e) => go({ pipeline: e.target.value })));
  }).catch(() => {});
}

// ---------------------------------------------------------------------------------------------
// Job view: /ui/jobs/{id}

async function jobView(jobId) {
  const signal = viewStreams.signal;
  const head = h("section", { class: "job-head" });
  const facts = h("dl", { class: "facts" });
  const timeline = h("ol", { class: "timeline" });
  const results = h("section", { class: "results" });
  const chain = h("p", { class: "chain" });
  let job = null;
  let stage = null;
  let timer = null;
  const events = [];

  $("view").replaceChildren(
    h("p", {}, h("a", { href: `${ROOT}/ui`, onclick: (e) => { e.preventDefault(); history.pushState(null, "", `${ROOT}/ui`); route(); } }, "← All jobs")),
    head,
    h("div", { class: "job-grid" },
      h("section", { class: "card" }, h("h2", {}, "Job"), facts, chain),
      h("section", { class: "card" }, h("h2", {}, "Timeline"), timeline)),
    h("section", { class: "card" }, h("h2", {}, "Partial results"), results));

  function fact(name, ...value) { return [h("dt", {}, name), h("dd", {}, ...value)]; }

  function renderJob() {
    const latency = job.cancel_latency;
    head.replaceChildren(
      h("h1", {}, "Job ", h("span", { class: "mono" }, job.job_id)),
      badge(job.status),
      h("span", { class: "spacer" }),
      ...actionButtons(job, refresh));
    facts.replaceChildren(
      ...fact("Pipeline", job.pipeline),
      ...fact("Progress", progressBar(job, job.status === "running" ? stage : null)),
      ...fact("Reason", job.cancellation_reason || "—", job.cancellation_source ? h("span", { class: "muted" }, ` · source ${job.cancellation_source}`) : ""),
      ...(job.cancellation_message ? fact("Message", job.cancellation_message) : []),
      ...(job.error ? fact("Error", h("span", { class: "error" }, job.error)) : []),
      ...fact("Created", when(job.created_at)),
      ...fact("Started", when(job.started_at) || "—"),
      ...fact("Finished", when(job.finished_at) || "—"),
      ...(latency ? fact("Cancel latency", `requested → observed ${ms(latency.request_to_observe_ms) || "—"}, ` +
        `observed → stopped ${ms(latency.observe_to_stop_ms) || "—"}`) : []),
      ...((job.tags || []).length ? fact("Tags", job.tags.map((t) => h("span", { class: "chip" }, t))) : []),
      ...(job.parent_job_id ? fact("Parent", jobLink(job.parent_job_id)) : []));
  }

  function jobLink(id) {
    return h("a", { class: "mono", href: `${ROOT}/ui/jobs/${id}`, title: id,
      onclick: (e) => { e.preventDefault(); history.pushState(null, "", `${ROOT}/ui/jobs/${id}`); route(); } }, shortId(id));
  }

  async function renderChain() {  // the resume chain: what this job resumes, and what resumed it
    const back = [];
    let from = job.resumed_from;
    while (from && back.length < 20) {
      back.unshift(from);
      try { from = (await api(`/api/jobs/${from}`)).data.resumed_from; } catch { break; }
    }
    const forward = [];
    let current = job.job_id;
    while (forward.length < 20) {
      const { data } = await api("/api/jobs", { query: { resumed_from: current, limit: 1 } });
      if (!data.length) break;
      current = data[0].job_id;
      forward.push(data[0]);
    }
    if (forward.length) job.resumed_by = forward[0].job_id;
    if (!back.length && !forward.length) return chain.replaceChildren();
    chain.replaceChildren(h("span", { class: "muted" }, "Resume chain: "),
      ...[...back.map(jobLink), h("strong", { class: "mono" }, shortId(job.job_id)), ...forward.map((j) => jobLink(j.job_id))]
        .flatMap((node, i) => (i ? [" → ", node] : [node])));
    renderJob();
  }

  function renderTimeline() {
    const start = events.length ? Date.parse(events[0].data.at) : 0;
    const at = (kind) => { const e = events.find((x) => x.event === kind); return e ? Date.parse(e.data.at) : null; };
    timeline.replaceChildren(...events.map(({ event, data }) => {
      const t = Date.parse(data.at);
      let note = "";
      if (event === "cancel_observed" && at("cancel_requested") !== null) note = `${ms(t - at("cancel_requested"))} after the request`;
      if (event === "cancelled" && at("cancel_observed") !== null) note = `${ms(t - at("cancel_observed"))} after it was observed`;
      const detail = data.detail && Object.keys(data.detail).length ? jsonText(data.detail, 160) : "";
      return h("li", { class: `ev ev-${event}` },
        h("span", { class: "ev-time mono", title: data.at }, `+${t - start < 1 ? "0 ms" : ms(t - start)}`),
        h("span", { class: "ev-kind" }, event.replace(/_/g, " ")),
        h("span", { class: "ev-who muted" }, [data.reason, data.source, data.actor].filter(Boolean).join(" · ")),
        note ? h("span", { class: "ev-note" }, note) : null,
        detail ? h("code", { class: "ev-detail" }, detail) : null);
    }));
  }

  async function renderResults() {
    // one page of up to 1,000 items (the API pages by cursor); the summary is the whole job's
    const { data, response } = await api(`/api/jobs/${jobId}/partial-results`, { query: { limit: 1000 } });
    const more = (response.headers.get("Link") || "").includes('rel="next"');
    const failedCount = job && typeof job.failed_items === "number" ? job.failed_items : data.failed_items.length;
    const entry = (r) => { const { index, ...rest } = r; return "result" in rest && Object.keys(rest).length === 1 ? rest.result : rest; };
    results.replaceChildren(
      h("p", { class: "summary" }, h("strong", {}, data.status), ` · ${data.completed_items} of ${data.total_items} items done ` +
        `(${data.completion_percent}%)` + (failedCount ? ` · ${failedCount} failed` : "") +
        (data.interrupted_items.length ? ` · ${data.interrupted_items.length} interrupted in flight` : "") +
        (data.cancelled_at_item !== null && data.cancelled_at_item !== undefined && data.job_status === "cancelled" ? ` · stopped at item ${data.cancelled_at_item}` : "") +
        (more ? " · the tables below show the first 1,000 items (GET /api/jobs/ID/partial-results pages by cursor)" : "")),
      itemTable("Results", ["#", "Result"], data.results.map((r) => [r.index, h("code", { title: jsonText(entry(r)) }, jsonText(entry(r), 140))]), "results"),
      itemTable("Failed items", ["#", "Stage", "Error"], data.failed_items.map((f) => [f.index, f.stage, h("span", { class: "error" }, f.error || "")]), "failed"),
      itemTable("Interrupted in flight", ["#", "Stage reached", "Partial"], data.interrupted_items.map((f) => [f.index, f.stage, f.partial == null ? "" : h("code", {}, jsonText(f.partial, 100))]), "interrupted"));
  }

  function itemTable(title, headers, body, name) {
    if (!body.length) return null;
    const shown = body.slice(0, 200);
    return h("div", { class: `items items-${name}` },
      h("h3", {}, `${title} (${body.length})`),
      h("table", {}, h("thead", {}, h("tr", {}, headers.map((t) => h("th", {}, t)))),
        h("tbody", {}, shown.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c)))))),
      body.length > shown.length ? h("p", { class: "muted" }, `… and ${body.length - shown.length} more (GET /api/jobs/${jobId}/partial-results)`) : null);
  }

  async function refresh() {
    job = (await api(`/api/jobs/${jobId}`)).data;
    renderJob();
    await Promise.all([renderResults(), renderChain()]);
  }

  function schedule() {
    if (timer) return;
    timer = setTimeout(() => { timer = null; refresh().catch(() => {}); }, 250);
  }

  feed.listener = (event, data) => {
    if (signal.aborted) return;
    if (data.job_id === jobId) {
      if (event === "progress") { stage = data.stage; if (job) renderJob(); } else schedule();
    } else if (event === "resumed" && data.detail && data.detail.resumed_from === jobId) schedule();
  };
  try {
    await refresh();
  } catch (err) {
    $("view").replaceChildren(h("p", { class: "error" }, err.status === 404 ? `No job ${jobId} (or not yours).` : err.message),
      h("p", {}, h("a", { href: `${ROOT}/ui` }, "← All jobs")));
    return;
  }
  if (signal.aborted) return;
  // the job's own stream: its whole history first, then live until it ends
  readEvents(`/api/jobs/${jobId}/events`, (event, data) => {
    if (event === "item" || event === "progress" || event === "end") {
      if (event === "end") schedule();
      return;
    }
    events.push({ event, data });
    renderTimeline();
  }, signal).catch(() => {});
}

// ---------------------------------------------------------------------------------------------
// Routing: /ui and /ui/jobs/{id}, in this one page

let viewStreams = new AbortController();  // a view's own streams end when another view is shown

function route() {
  feed.listener = null;
  viewStreams.abort();
  viewStreams = new AbortController();
  const path = location.pathname.slice(ROOT.length);
  const match = path.match(/^\/ui\/jobs\/([^/]+)\/?$/);
  const shown = match ? jobView(decodeURIComponent(match[1])) : jobsView();
  document.title = match ? `andon · job ${shortId(decodeURIComponent(match[1]))}` : "andon · jobs";
  shown.catch((err) => say(err.message, "error"));
}

document.addEventListener("DOMContentLoaded", () => {
  setupToken();
  window.addEventListener("popstate", route);
  route();
  feed.start();
});
