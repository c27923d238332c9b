// rlhfkit annotate: keyboard shortcuts and submission for the server-rendered pages.
// Plain JavaScript, no dependencies, loaded from /static (the Content-Security-Policy forbids inline
// script). Model text is never written with innerHTML: the server renders it escaped and this file
// only reads form controls and writes messages with textContent.
"use strict";

function csrfToken() {
  const m = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return m ? decodeURIComponent(m[1]) : "";
}

async function post(url, body, method) {
  const res = await fetch(url, {
    method: method || "POST",
    credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRFToken": csrfToken(), "Accept": "application/json"},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = {};
  try { data = await res.json(); } catch (e) { /* not JSON */ }
  return {ok: res.ok, status: res.status, data: data};
}

function typing(target) {
  return target && (target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && target.type !== "radio" &&
    target.type !== "checkbox") || target.tagName === "SELECT");
}

function toggleHelp(show) {
  const help = document.getElementById("help");
  if (!help) return;
  help.hidden = show === undefined ? !help.hidden : !show;
}

function setStatus(text, isError) {
  const el = document.getElementById("status");
  if (!el) return;
  el.textContent = text;
  el.className = isError ? "error" : "";
}

// ------------------------------------------------------------------ the answer a form holds
function collect(form, spec) {
  const checked = (name) => form.querySelector(`input[name="${name}"]:checked`);
  if (spec.task === "pairwise") {
    const c = checked("preference");
    if (!c) return {error: "Choose on the scale first (keys 1 to " + form.querySelectorAll('input[name="preference"]').length + ")."};
    const answer = {preference: parseInt(c.value, 10)};
    const reason = form.querySelector("#reason");
    if (reason && reason.value.trim()) answer.reason = reason.value;
    return {answer};
  }
  if (spec.task === "ranking") {
    const ranks = Array.from(form.querySelectorAll('select[name="rank"]')).map((s) => parseInt(s.value, 10));
    if (ranks.some((r) => !(r >= 1))) return {error: "Give every response a rank."};
    return {answer: {ranks}};
  }
  if (spec.task === "likert") {
    const c = checked("rating");
    if (!c) return {error: "Choose a rating first."};
    const flags = Array.from(form.querySelectorAll('input[name="flags"]:checked')).map((x) => x.value);
    return {answer: {rating: parseInt(c.value, 10), flags}};
  }
  if (spec.task === "steps") {
    const labels = [];
    for (let i = 0; i < spec.n; i++) {
      const c = checked("step-" + i);
      if (!c) break;
      labels.push(parseInt(c.value, 10));
      if (spec.options.stop_at_first_wrong && labels[labels.length - 1] === -1) break;
    }
    const complete = labels.length === spec.n || (spec.options.stop_at_first_wrong && labels[labels.length - 1] === -1);
    if (!complete) return {error: "Label every step" + (spec.options.stop_at_first_wrong ? " up to the first wrong one." : ".")};
    return {answer: {labels}};
  }
  const critique = form.querySelector("#critique").value;
  if (!critique.trim()) return {error: "Write a critique first."};
  return {answer: {critique}};
}

// ------------------------------------------------------------------ the current row (ranking, steps)
function rows(form) { return Array.from(form.querySelectorAll(".rank-row, .step")); }
function current(form) { return form.querySelector(".rank-row.current, .step.current"); }
function move(form, delta) {
  const all = rows(form);
  const cur = current(form);
  let i = cur ? all.indexOf(cur) : 0;
  i = Math.max(0, Math.min(all.length - 1, i + delta));
  all.forEach((r) => r.classList.remove("current"));
  if (all[i]) { all[i].classList.add("current"); all[i].scrollIntoView({block: "nearest"}); }
}

function stepsLocked(form, spec) {
  // with stop_at_first_wrong, the steps after the first -1 take no label
  if (!spec.options.stop_at_first_wrong) return;
  let wrong = false;
  rows(form).forEach((row) => {
    row.querySelectorAll("input").forEach((inp) => { inp.disabled = wrong; if (wrong) inp.checked = false; });
    const c = row.querySelector("input:checked");
    if (c && c.value === "-1") wrong = true;
  });
}

// ------------------------------------------------------------------ the annotate page
function setupJudge(form) {
  const spec = JSON.parse(form.dataset.item);
  const base = `/api/projects/${encodeURIComponent(spec.project)}/items/${spec.item}`;
  let busy = false;

  async function submit() {
    if (busy) return;
    const got = collect(form, spec);
    if (got.error) { setStatus(got.error, true); return; }
    busy = true;
    setStatus("Saving…");
    const res = await post(base + "/judgement", got.answer);
    busy = false;
    if (res.ok) { setStatus("Saved."); window.location.reload(); }
    else setStatus(`Not saved (${res.status}): ${res.data.detail || "error"}`, true);
  }

  async function skip(flag, reason) {
    const res = await post(base + "/skip", {flag: !!flag, reason: reason || ""});
    if (res.ok) window.location.reload();
    else setStatus(`Not saved (${res.status}): ${res.data.detail || "error"}`, true);
  }

  form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  document.getElementById("skip").addEventListener("click", () => skip(false));
  const flagBox = document.getElementById("flag-box");
  const flagReason = document.getElementById("flag-reason");
  document.getElementById("flag").addEventListener("click", () => { flagBox.hidden = false; flagReason.focus(); });
  document.getElementById("flag-send").addEventListener("click", () => skip(true, flagReason.value));
  flagReason.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); e.stopPropagation(); skip(true, flagReason.value); }
  });
  form.querySelectorAll(".rank-row, .step").forEach((row) => {
    row.addEventListener("click", () => { rows(form).forEach((r) => r.classList.remove("current")); row.classList.add("current"); });
  });
  form.addEventListener("change", () => { if (spec.task === "steps") stepsLocked(form, spec); });

  document.addEventListener("keydown", (e) => {
    if (e.defaultPrevented || e.altKey || e.metaKey) return;
    const help = document.getElementById("help");
    if (e.key === "Escape") { toggleHelp(false); if (typing(e.target)) e.target.blur(); return; }
    if (typing(e.target)) {
      if (e.key === "Enter" && e.ctrlKey && e.target !== flagReason) { e.preventDefault(); submit(); }
      return;
    }
    if (e.ctrlKey) return;
    if (e.key === "?") { e.preventDefault(); toggleHelp(); return; }
    if (help && !help.hidden) return;
    if (e.key === "Enter") { e.preventDefault(); submit(); return; }
    if (e.key === "S" && e.shiftKey) { e.preventDefault(); skip(false); return; }
    if (e.key === "F" && e.shiftKey) { e.preventDefault(); flagBox.hidden = false; flagReason.focus(); return; }
    if (spec.task === "pairwise" || spec.task === "likert") {
      const radio = form.querySelector(`input[type="radio"][data-key="${CSS.escape(e.key)}"]`);
      if (radio) { e.preventDefault(); radio.checked = true; radio.focus(); return; }
      const box = form.querySelector(`input[type="checkbox"][data-key="${CSS.escape(e.key)}"]`);
      if (box) { e.preventDefault(); box.checked = !box.checked; return; }
      if (e.key === "r" && form.querySelector("#reason")) { e.preventDefault(); form.querySelector("#reason").focus(); }
      return;
    }
    if (spec.task === "ranking" || spec.task === "steps") {
      if (e.key === "j" || e.key === "ArrowDown") { e.preventDefault(); move(form, 1); return; }
      if (e.key === "k" || e.key === "ArrowUp") { e.preventDefault(); move(form, -1); return; }
      const row = current(form);
      if (!row) return;
      if (spec.task === "ranking" && /^[1-9]$/.test(e.key) && parseInt(e.key, 10) <= spec.n) {
        e.preventDefault();
        row.querySelector("select").value = e.key;
        move(form, 1);
        return;
      }
      const value = {"+": "1", "=": "1", "0": "0", "-": "-1"}[e.key];
      if (spec.task === "steps" && value !== undefined) {
        const inp = row.querySelector(`input[value="${value}"]`);
        if (inp && !inp.disabled) {
          e.preventDefault();
          inp.checked = true;
          stepsLocked(form, spec);
          move(form, 1);
        }
      }
      return;
    }
    if (spec.task === "critique" && e.key === "c") { e.preventDefault(); form.querySelector("#critique").focus(); }
  });
}

// ------------------------------------------------------------------ every page
document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".help-toggle").forEach((b) => b.addEventListener("click", () => toggleHelp()));
  const help = document.getElementById("help");
  if (help) help.addEventListener("click", (e) => { if (e.target === help) toggleHelp(false); });
  // forms that change state (log out) go through fetch, with the CSRF header
  document.querySelectorAll("form.js-post").forEach((f) => f.addEventListener("submit", async (e) => {
    e.preventDefault();
    const res = await fetch(f.action, {method: "POST", credentials: "same-origin", headers: {"X-CSRFToken": csrfToken()},
                                       redirect: "follow"});
    window.location.assign(res.url || "/login");
  }));
  const form = document.getElementById("judge");
  if (form) setupJudge(form);
  else document.addEventListener("keydown", (e) => {
    if (e.key === "?" && !typing(e.target)) { e.preventDefault(); toggleHelp(); }
    if (e.key === "Escape") toggleHelp(false);
  });
});
