// The chat page of `lmforge serve`: plain JS over the server's OpenAI routes, no build step, nothing external.
//
// State is one list of turns ({role, content, ...}); each assistant turn keeps its view (the DOM nodes of its
// bubble), `sent`, the exact messages of the request that produced it (what its feedback is filed with), and `rag`,
// whether that request asked the server to answer from its documents (Regenerate asks the same way again).
// Model output only ever reaches the page as text (textContent / text nodes), never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    model: $("model"), status: $("status"), newChat: $("new-chat"), keyRow: $("api-key-row"), key: $("api-key"),
    saveKey: $("save-key"), system: $("system"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
    messages: $("messages"), empty: $("empty"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
    regenerate: $("regenerate"), rag: $("rag"), ragField: $("rag-field"),
  };
  const KEY_STORAGE = "lmforge.apiKey";
  const FINISH_NOTES = {
    length: "cut off: the token limit was reached",
    abort: "ended by the server",
    stopped: "stopped",
    incomplete: "the connection closed before the answer finished",
  };

  const state = {
    model: null, // the chat model's id, from /v1/models
    turns: [], // {role: "user", content} | {role: "assistant", content, sent, rag, citations, view, failed, rating}
    controller: null, // the AbortController of the answer streaming now
  };

  // ---- talking to the server ------------------------------------------------------------------------------

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function authHeaders() {
    const key = localStorage.getItem(KEY_STORAGE);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function api(path, options = {}) {
    const headers = { ...authHeaders(), ...(options.body ? { "Content-Type": "application/json" } : {}) };
    const response = await fetch(path, { ...options, headers });
    if (response.ok) return response;
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON: keep the status line */ }
    if (response.status === 401) showKeyRow();
    throw new HttpError(response.status, message);
  }

  async function loadModel() {
    const models = (await (await api("/v1/models")).json()).data || [];
    const chat = models.find((m) => m.kind === "chat") || models[0];
    if (!chat) throw new Error("the server lists no chat model");
    state.model = chat.id;
    el.model.textContent = chat.context_length ? `${chat.id} · ${chat.context_length} tokens` : chat.id;
    el.model.title = `model: ${chat.id}`;
    return chat.id;
  }

  // The RAG toggle is offered only when the server has a document store (/health says `rag: true`).
  async function loadRag() {
    let rag = false;
    try {
      rag = (await (await api("/health")).json()).rag === true;
    } catch (_) { /* no answer about it: no toggle */ }
    el.ragField.hidden = !rag;
    if (!rag) el.rag.checked = false;
    ragChanged();
    return rag;
  }

  function useRag() {
    return !el.ragField.hidden && el.rag.checked;
  }

  function ragChanged() {
    el.prompt.placeholder = useRag() ? "Ask the indexed documents…" : "Message the model…";
  }

  // ---- status, API key ------------------------------------------------------------------------------------

  function setStatus(text, kind = "idle") {
    el.status.textContent = text;
    el.status.dataset.state = kind;
  }

  function showKeyRow() {
    el.keyRow.hidden = false;
    el.key.value = localStorage.getItem(KEY_STORAGE) || "";
    el.key.focus();
  }

  async function saveKey() {
    const key = el.key.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    try {
      await loadModel();
      el.keyRow.hidden = true;
      const last = state.turns[state.turns.length - 1];
      setStatus(last && last.failed ? "key saved: press Regenerate to retry" : "ready");
      el.prompt.focus();
    } catch (e) {
      setStatus(e.message, "error");
    }
  }

  // ---- rendering ------------------------------------------------------------------------------------------

  const ICONS = { // thumbs, as SVG paths (Feather icons, MIT)
    up: "M14 9V5a3 3 0 0 0-3-3l-4 9v11h11.28a2 2 0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3zM7 22H4a2 2 0 0 1-2-2v-7a2 2 0 0 1 2-2h3",
    down: "M10 15v4a3 3 0 0 0 3 3l4-9V2H5.72a2 2 0 0 0-2 1.7l-1.38 9a2 2 0 0 0 2 2.3zm7-13h2.67A2.31 2.31 0 0 1 22 4v7a2.31 2.31 0 0 1-2.33 2H17",
  };

  function icon(path) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    const p = document.createElementNS(ns, "path");
    p.setAttribute("d", path);
    svg.append(p);
    return svg;
  }

  function node(tag, className, text) {
    const n = document.createElement(tag);
    if (className) n.className = className;
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function nearBottom() {
    const m = el.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }

  function scrollDown(force = false) {
    if (force || nearBottom()) el.messages.scrollTop = el.messages.scrollHeight;
  }

  function addBubble(role) {
    el.empty.hidden = true;
    const root = node("div", `message ${role}`);
    root.dataset.testid = `message-${role}`;
    root.append(node("div", "role", role === "user" ? "You" : "Assistant"));
    const content = node("div", "content");
    root.append(content);
    el.messages.append(root);
    return { root, content };
  }

  function addUser(text) {
    const view = addBubble("user");
    view.content.textContent = text;
    scrollDown(true);
  }

  // An assistant bubble: its text, a slot for what comes under an answer (sources, later), a note, the thumbs.
  function addAssistant() {
    const view = addBubble("assistant");
    view.extras = node("div", "extras"); // the sources of a RAG answer
    view.footer = node("div", "footer");
    view.note = node("span", "note");
    view.actions = node("span", "actions");
    view.footer.append(view.note, view.actions);
    view.root.append(view.extras, view.footer);
    scrollDown(true);
    return view;
  }

  function resetAssistant(view) {
    view.content.textContent = "";
    view.extras.replaceChildren();
    view.sources = null;
    view.note.textContent = "";
    view.actions.replaceChildren();
    view.root.classList.remove("failed", "error");
  }

  function basename(path) {
    return String(path).split(/[\\/]/).filter(Boolean).pop() || String(path);
  }

  // The sources of a RAG answer, from a chunk's `citations`: "[n] title  file", the chunk's text on click, the ones
  // the answer cites marked once `final` (the chunk with the finish reason) says which. [] means nothing was found.
  function renderSources(citations, final = false) {
    const box = node("div", "sources-box");
    if (!citations.length) {
      box.append(node("p", "sources-note", "no matching documents"));
      return box;
    }
    const list = node("ol", "sources");
    list.setAttribute("aria-label", "Sources");
    for (const c of citations) {
      const item = node("li", "source");
      item.dataset.n = String(c.n);
      item.dataset.testid = "source";
      const details = node("details");
      const summary = node("summary");
      summary.title = `${c.source}, characters ${c.start}–${c.end}, similarity ${Number(c.score).toFixed(2)}`;
      summary.append(node("span", "source-n", `[${c.n}]`), node("span", "source-title", c.title || basename(c.source)),
        node("span", "source-file", basename(c.source)));
      details.append(summary, node("div", "source-text", c.text));
      item.append(details);
      list.append(item);
    }
    box.append(node("div", "sources-head", "Sources"), list);
    markCited(box, citations, final);
    return box;
  }

  function markCited(box, citations, final) {
    const cited = new Set(citations.filter((c) => c.cited).map((c) => String(c.n)));
    for (const item of box.querySelectorAll(".source")) {
      const on = cited.has(item.dataset.n);
      item.classList.toggle("cited", on);
      if (on) item.title = "the answer cites this source";
      else item.removeAttribute("title");
    }
    const list = box.querySelector(".sources");
    if (list) list.classList.toggle("final", final);
    const head = box.querySelector(".sources-head");
    if (head) head.textContent = final ? `Sources · ${cited.size ? `${cited.size} cited` : "none cited"}` : "Sources";
  }

  // A chunk's citations into the answer's bubble: drawn with the opening chunk, marked in place with the last one
  // (so a source the reader opened stays open).
  function showSources(view, citations, final) {
    const follow = nearBottom();
    const box = view.extras.querySelector(".sources-box");
    if (box && box.querySelectorAll(".source").length === citations.length && citations.length) {
      markCited(box, citations, final);
    } else {
      view.extras.replaceChildren(renderSources(citations, final));
    }
    if (follow) scrollDown(true);
  }

  function thumbs(turn) {
    const view = turn.view;
    const make = (rating, cls, label) => {
      const b = node("button", `thumb ${cls}`);
      b.type = "button";
      b.title = label;
      b.setAttribute("aria-label", label);
      b.setAttribute("aria-pressed", "false");
      b.dataset.testid = cls;
      b.append(icon(rating > 0 ? ICONS.up : ICONS.down));
      b.addEventListener("click", () => rate(turn, rating));
      return b;
    };
    view.up = make(1, "thumb-up", "Good answer");
    view.down = make(-1, "thumb-down", "Bad answer");
    view.actions.replaceChildren(view.up, view.down);
  }

  async function rate(turn, rating) {
    const { up, down, note } = turn.view;
    up.disabled = down.disabled = true;
    try {
      await api("/v1/feedback", {
        method: "POST",
        body: JSON.stringify({ messages: turn.sent, response: turn.content, rating }),
      });
      turn.rating = rating;
      for (const [b, r] of [[up, 1], [down, -1]]) {
        b.classList.toggle("selected", r === rating);
        b.classList.toggle("saved", r === rating);
        b.setAttribute("aria-pressed", String(r === rating));
      }
      note.textContent = "feedback saved, thanks";
      note.className = "note saved";
    } catch (e) {
      note.textContent = `feedback not saved: ${e.message}`;
      note.className = "note error";
    } finally {
      up.disabled = down.disabled = false;
    }
  }

  // ---- asking ---------------------------------------------------------------------------------------------

  function streaming() {
    return state.controller !== null;
  }

  function updateButtons() {
    const busy = streaming();
    el.send.hidden = busy;
    el.send.disabled = busy;
    el.stop.hidden = !busy;
    el.stop.disabled = !busy;
    const last = state.turns[state.turns.length - 1];
    el.regenerate.disabled = busy || !last || last.role !== "assistant";
  }

  function temperature() {
    const t = parseFloat(el.temperature.value);
    return Number.isFinite(t) ? t : 0.2;
  }

  // The request's messages: the system prompt (if any), then every turn before `upTo` that holds text.
  function requestMessages(upTo) {
    const messages = [];
    const system = el.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const turn of state.turns.slice(0, upTo)) {
      if (!turn.failed) messages.push({ role: turn.role, content: turn.content });
    }
    return messages;
  }

  function send() {
    const text = el.prompt.value.trim();
    if (!text || streaming()) return;
    state.turns.push({ role: "user", content: text });
    addUser(text);
    el.prompt.value = "";
    autosize();
    const turn = { role: "assistant", content: "", rag: useRag(), view: addAssistant() };
    state.turns.push(turn);
    answer(turn);
  }

  function regenerate() {
    const turn = state.turns[state.turns.length - 1];
    if (streaming() || !turn || turn.role !== "assistant") return;
    answer(turn); // the same conversation again (with or without documents, as before); the bubble is reused
  }

  // Stream one answer into `turn` (the last turn): SSE lines "data: {chunk}" until "data: [DONE]".
  async function answer(turn) {
    const controller = new AbortController();
    state.controller = controller;
    turn.content = "";
    turn.failed = false;
    turn.rating = undefined;
    turn.citations = null;
    turn.sent = requestMessages(state.turns.indexOf(turn));
    const view = turn.view;
    resetAssistant(view);
    view.root.classList.add("streaming");
    updateButtons();
    setStatus("generating…", "busy");
    let finish = null;
    let error = null;
    try {
      const model = state.model || (await loadModel());
      const response = await api("/v1/chat/completions", {
        method: "POST",
        signal: controller.signal,
        body: JSON.stringify({
          model, messages: turn.sent, temperature: temperature(), stream: true, ...(turn.rag ? { rag: true } : {}),
        }),
      });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      read: for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        const lines = buffer.split("\n");
        buffer = lines.pop();
        for (const raw of lines) {
          const line = raw.trim();
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") break read;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "the server failed mid-answer");
          finish = onChunk(turn, chunk) || finish;
        }
      }
    } catch (e) {
      if (e.name === "AbortError") finish = "stopped";
      else error = e;
    }
    if (state.controller === controller) state.controller = null;
    finished(turn, finish, error);
  }

  // One streamed chunk: its text goes into the bubble, its citations (RAG: the opening and the last chunk) under
  // it; returns the finish reason once there is one.
  function onChunk(turn, chunk) {
    const choice = chunk.choices && chunk.choices[0];
    if (Array.isArray(chunk.citations)) {
      turn.citations = chunk.citations;
      showSources(turn.view, chunk.citations, Boolean(choice && choice.finish_reason));
    }
    if (!choice) return null;
    const piece = choice.delta && choice.delta.content;
    if (piece) {
      const follow = nearBottom();
      turn.content += piece;
      turn.view.content.append(document.createTextNode(piece));
      if (follow) scrollDown(true);
    }
    return choice.finish_reason || null;
  }

  function finished(turn, finish, error) {
    const view = turn.view;
    view.root.classList.remove("streaming");
    if (error) {
      turn.failed = !turn.content; // an answer with no text is left out of later requests
      view.root.classList.add("error");
      if (turn.failed) view.root.classList.add("failed");
      const hint = error.status === 401 ? " (enter the key above, then Regenerate)" : "";
      view.note.textContent = `error: ${error.message}${hint}`;
      view.note.className = "note error";
      setStatus(`error: ${error.message}`, "error");
    } else {
      const reason = finish || "incomplete";
      view.note.textContent = FINISH_NOTES[reason] || "";
      view.note.className = "note";
      setStatus(reason === "stopped" ? "stopped" : "ready");
    }
    view.root.dataset.finish = error ? "error" : finish || "incomplete";
    if (!turn.failed && turn.content) thumbs(turn);
    updateButtons();
    if (!streaming()) el.prompt.focus();
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function newChat() {
    stop();
    state.controller = null;
    state.turns = [];
    for (const m of [...el.messages.querySelectorAll(".message")]) m.remove();
    el.empty.hidden = false;
    updateButtons();
    if (state.model) setStatus("ready");
    el.prompt.focus();
  }

  // ---- wiring ---------------------------------------------------------------------------------------------

  function autosize() {
    el.prompt.style.height = "auto";
    el.prompt.style.height = `${Math.min(el.prompt.scrollHeight, 220)}px`;
  }

  el.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  el.prompt.addEventListener("input", autosize);
  el.send.addEventListener("click", send);
  el.stop.addEventListener("click", stop);
  el.regenerate.addEventListener("click", regenerate);
  el.newChat.addEventListener("click", newChat);
  el.saveKey.addEventListener("click", saveKey);
  el.key.addEventListener("keydown", (e) => {
    if (e.key === "Enter") saveKey();
  });
  el.rag.addEventListener("change", ragChanged);
  el.temperature.addEventListener("input", () => {
    el.temperatureValue.textContent = temperature().toFixed(2).replace(/0$/, "");
  });

  updateButtons();
  Promise.all([loadModel(), loadRag()]).then(
    () => streaming() || setStatus("ready"),
    (e) => setStatus(e.status === 401 ? "API key needed" : `error: ${e.message}`, "error"),
  );
})();
