// ferry's chat page: conversations over the REST API (/api/v1/...), turns over the chat WebSocket
// (/chat/ws). The API key lives in sessionStorage only (gone when the browser session ends).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY = "ferry.key";
  const THEME = "ferry.theme";
  const state = { key: sessionStorage.getItem(KEY) || "", conversation: null, socket: null, ready: null, turn: null, seq: 0 };

  // -- theme: the system setting unless the toggle chose one ------------------------------------
  function applyTheme(theme) {
    if (theme) document.documentElement.dataset.theme = theme;
    else delete document.documentElement.dataset.theme;
  }
  applyTheme(localStorage.getItem(THEME));
  $("theme").addEventListener("click", () => {
    const dark = getComputedStyle(document.documentElement).getPropertyValue("--bg").trim() === "#0d1117";
    const next = dark ? "light" : "dark";
    localStorage.setItem(THEME, next);
    applyTheme(next);
  });

  // -- key ---------------------------------------------------------------------------------------
  function keyRefused(message) {
    sessionStorage.removeItem(KEY);
    state.key = "";
    if (state.socket) state.socket.close();
    state.socket = null;
    $("app").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message;
  }
  const WRONG_KEY = "That API key was not accepted (401 Unauthorized): check it and enter it again.";

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key").value.trim();
    if (!state.key) return;
    sessionStorage.setItem(KEY, state.key);
    $("key").value = "";
    start();
  });
  $("forget").addEventListener("click", () => keyRefused(""));

  async function api(method, path, body) {
    const response = await fetch(path, {
      method,
      headers: { Authorization: "Bearer " + state.key, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) {
      keyRefused(WRONG_KEY);
      throw new Error("unauthenticated");
    }
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const message = (data.error && data.error.message) || data.message || response.statusText;
      throw new Error(`${response.status}: ${message}`);
    }
    return data;
  }

  function status(text) { $("status").textContent = text || ""; }

  // -- WebSocket ---------------------------------------------------------------------------------
  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}/chat/ws`);
    state.socket = socket;
    state.ready = new Promise((resolve, reject) => {
      socket.addEventListener("open", () => socket.send(JSON.stringify({ type: "auth", api_key: state.key })));
      socket.addEventListener("message", (event) => {
        const frame = JSON.parse(event.data);
        if (frame.type === "ready") resolve(socket);
        else if (frame.type === "error" && !frame.id) {
          reject(new Error(frame.message));
          if (frame.code === "UNAUTHENTICATED") keyRefused(WRONG_KEY);
          else status(frame.message);
        } else onFrame(frame);
      });
      socket.addEventListener("close", () => {
        if (state.socket === socket) state.socket = null;
        reject(new Error("closed"));
        if (state.turn) finishTurn();
      });
    });
    state.ready.catch(() => {});
    return state.ready;
  }

  async function socket() {
    if (!state.socket) connect();
    return state.ready;
  }

  // -- rendering ---------------------------------------------------------------------------------
  function bubble(message) {
    const role = message.role === "ROLE_USER" ? "user" : "assistant";
    const div = document.createElement("div");
    div.className = "message " + role;
    div.dataset.name = message.name || "";
    const meta = document.createElement("div");
    meta.className = "meta";
    const who = document.createElement("span");
    who.textContent = role === "user" ? "You" : "Assistant";
    meta.append(who);
    if ((message.version_count || 1) > 1) {
      const version = document.createElement("span");
      version.className = "version";
      version.textContent = `version ${message.version} of ${message.version_count}`;
      meta.append(version);
    }
    if (message.left_out_turns > 0) {
      const left = document.createElement("span");
      left.className = "left-out";
      left.textContent = `${message.left_out_turns} earlier turn(s) left out to fit the context`;
      meta.append(left);
    }
    if (message.finish_reason === "FINISH_REASON_CANCELLED") {
      const stopped = document.createElement("span");
      stopped.textContent = "stopped";
      meta.append(stopped);
    }
    if (message.name) {
      const action = document.createElement("button");
      action.type = "button";
      action.className = role === "user" ? "edit" : "regenerate";
      action.textContent = role === "user" ? "Edit" : "Regenerate";
      action.addEventListener("click", () => (role === "user" ? edit(div, message) : regenerate(message)));
      meta.append(action);
    }
    const body = document.createElement("div");
    body.className = "body";
    body.append(window.ferryMarkdown.render(message.content || ""));
    div.append(meta, body);
    return div;
  }

  function setBody(div, text) {
    const body = div.querySelector(".body");
    body.replaceChildren(window.ferryMarkdown.render(text));
    $("messages").scrollTop = $("messages").scrollHeight;
  }

  async function showMessages() {
    const list = $("messages");
    if (!state.conversation) { list.replaceChildren(); return; }
    const data = await api("GET", `/api/v1/${state.conversation.name}/messages`);
    list.replaceChildren(...(data.messages || []).map(bubble));
    list.scrollTop = list.scrollHeight;
  }

  async function showConversations() {
    const data = await api("GET", "/api/v1/conversations?page_size=50");
    const items = (data.conversations || []).map((c) => {
      const li = document.createElement("li");
      li.textContent = c.title || "New chat";
      li.title = c.name;
      li.dataset.name = c.name;
      if (state.conversation && c.name === state.conversation.name) li.className = "active";
      li.addEventListener("click", () => open(c));
      return li;
    });
    $("conversations").replaceChildren(...items);
  }

  async function open(conversation) {
    state.conversation = conversation;
    const model = conversation.model.replace(/^models\//, "");
    if ([...$("model").options].some((o) => o.value === model)) $("model").value = model;
    status("");
    await Promise.all([showMessages(), showConversations()]);
  }

  // -- turns -------------------------------------------------------------------------------------
  function busy(on) {
    $("send").hidden = on;
    $("stop").hidden = !on;
    $("input").disabled = on;
  }

  async function runTurn(fields, after) {
    const ws = await socket().catch(() => null);
    if (!ws) return;
    const id = "t" + ++state.seq;
    const list = $("messages");
    if (after !== undefined) {
      // An edit or regeneration: the branch continues from `after` (what followed it is replaced).
      const kept = [...list.children].slice(0, after);
      list.replaceChildren(...kept);
    }
    const answer = bubble({ role: "ROLE_ASSISTANT", content: "" });
    answer.classList.add("streaming");
    state.turn = { id, answer, text: "", user: null };
    busy(true);
    status("");
    ws.send(JSON.stringify({ type: "turn", id, conversation: state.conversation.name, ...fields }));
  }

  function finishTurn() {
    state.turn = null;
    busy(false);
    showMessages().catch(() => {});
    showConversations().catch(() => {});
  }

  function onFrame(frame) {
    const turn = state.turn;
    if (!turn || frame.id !== turn.id) return;
    if (frame.type === "user_message") {
      const list = $("messages");
      const existing = [...list.children].find((d) => d.dataset.name === frame.message.name);
      if (!existing) list.append(bubble(frame.message));
      list.append(turn.answer);
    } else if (frame.type === "token") {
      turn.text += frame.text;
      setBody(turn.answer, turn.text);
    } else if (frame.type === "done") {
      finishTurn();
    } else if (frame.type === "error") {
      status(frame.status === 401 ? WRONG_KEY : frame.message);
      if (frame.status === 401) keyRefused(WRONG_KEY);
      finishTurn();
    }
  }

  $("composer").addEventListener("submit", async (event) => {
    event.preventDefault();
    const content = $("input").value.trim();
    if (!content || state.turn) return;
    try {
      if (!state.conversation) {
        state.conversation = await api("POST", "/api/v1/conversations", { model: $("model").value });
        await showConversations();
      }
    } catch (err) {
      status(String(err.message || err));
      return;
    }
    $("input").value = "";
    await runTurn({ content });
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => {
    if (state.turn && state.socket) state.socket.send(JSON.stringify({ type: "cancel", id: state.turn.id }));
  });
  $("new").addEventListener("click", () => {
    state.conversation = null;
    $("messages").replaceChildren();
    showConversations().catch(() => {});
    $("input").focus();
  });

  function edit(div, message) {
    if (state.turn) return;
    const body = div.querySelector(".body");
    const area = document.createElement("textarea");
    area.className = "edit-input";
    area.value = message.content;
    const save = document.createElement("button");
    save.type = "button";
    save.className = "save";
    save.textContent = "Save and regenerate";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.textContent = "Cancel";
    cancel.addEventListener("click", () => showMessages());
    save.addEventListener("click", () => {
      const index = [...$("messages").children].indexOf(div);
      runTurn({ edit: { message: message.name, content: area.value } }, index);
    });
    body.replaceChildren(area, save, cancel);
    area.focus();
  }

  function regenerate(message) {
    if (state.turn) return;
    const index = [...$("messages").children].findIndex((d) => d.dataset.name === message.name);
    runTurn({ regenerate: { message: message.name } }, index);
  }

  // -- start -------------------------------------------------------------------------------------
  async function start() {
    $("login").hidden = true;
    try {
      const data = await api("GET", "/api/v1/models");
      const chat = (data.models || []).filter((m) => !m.capabilities || !m.capabilities.length || m.capabilities.includes("chat"));
      $("model").replaceChildren(...chat.map((m) => {
        const option = document.createElement("option");
        option.value = m.model_id || m.name.replace(/^models\//, "");
        option.textContent = option.value;
        return option;
      }));
      const preferred = chat.find((m) => (m.model_id || "").includes("instruct"));
      if (preferred) $("model").value = preferred.model_id;
      $("app").hidden = false;
      await showConversations();
      await connect();
    } catch (err) {
      if (state.key) status(String(err.message || err));
    }
  }

  if (state.key) start();
  else $("login").hidden = false;
})();
