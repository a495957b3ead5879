// The chat page: a name, rooms with their member counts across the cluster, the
// gateway this page is connected to, history on join, and what a reconnect kept.
// Uses the official socket.io-client in its default mode (polling, then websocket).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const log = (text, cls) => {
    const p = document.createElement("p");
    p.textContent = text;
    if (cls) p.className = cls;
    $("log").appendChild(p);
    $("log").scrollTop = $("log").scrollHeight;
  };
  const banner = (text, cls) => { $("banner").textContent = text; $("banner").className = cls || ""; };
  if (typeof io === "undefined") {
    $("status").textContent = "socket.io-client is not installed on this gateway (run npm ci)";
    return;
  }
  const saved = (() => { try { return localStorage.getItem("chat.name"); } catch (e) { return null; } })();
  const name = saved || "guest-" + Math.random().toString(36).slice(2, 6);
  $("name").value = name;
  // with a gateway running --recovery, a reconnect within the window restores the
  // session (same id, its rooms, every message it missed); the name goes with every
  // (re)connect, so whichever gateway takes the session knows it
  const socket = io({ auth: { name } });
  let room = null;           // where "Send" goes
  const rooms = new Map();   // joined room -> member count (null: not known yet)
  window.chat = { socket, joined: () => room, rooms, messages: [], history: [], connects: [], node: null };

  const who = (msg) => msg.name || msg.from;
  const show = (msg, cls, suffix) => log("[" + msg.room + "] " + who(msg) + ": " + msg.text + (suffix || ""), cls);

  const drawRooms = () => {
    const list = $("rooms");
    list.replaceChildren();
    for (const [r, count] of rooms) {
      const li = document.createElement("li");
      li.dataset.room = r;
      if (r === room) li.className = "current";
      const label = document.createElement("span");
      label.textContent = r;
      const badge = document.createElement("span");
      badge.className = "count";
      badge.title = "members on every gateway";
      badge.textContent = count === null ? "…" : String(count);
      li.append(label, badge);
      li.addEventListener("click", () => { room = r; drawRooms(); });
      list.appendChild(li);
    }
  };
  // member counts come from any gateway (GET /api/rooms/{room} counts the whole cluster)
  const countMembers = async () => {
    for (const r of Array.from(rooms.keys())) {
      try {
        const res = await fetch("/api/rooms/" + encodeURIComponent(r), { cache: "no-store" });
        if (res.ok && rooms.has(r)) rooms.set(r, (await res.json()).members);
      } catch (e) { /* the next round tries again */ }
    }
    drawRooms();
  };
  setInterval(countMembers, 3000);

  const status = () => {
    const transport = socket.io.engine ? socket.io.engine.transport.name : "?";
    $("status").replaceChildren();
    const parts = socket.connected
      ? ["connected as ", [name], " on gateway ", [window.chat.node || "…"], " (" + transport + ")"]
      : ["disconnected"];
    for (const part of parts) {
      if (Array.isArray(part)) { const b = document.createElement("b"); b.textContent = part[0]; $("status").appendChild(b); }
      else $("status").appendChild(document.createTextNode(part));
    }
  };
  const whoami = () => socket.emit("whoami", (ack) => {
    if (ack && ack.ok) { window.chat.node = ack.node; status(); }
  });

  const join = (name, history, onJoined) => {
    // ask for the room's recent messages (kept by gateways running --recovery)
    socket.emit("join", { room: name, history }, (ack) => {
      if (ack && ack.ok) {
        if (!rooms.has(ack.room)) rooms.set(ack.room, null);
        room = ack.room;
        drawRooms();
        countMembers();
        if (onJoined) onJoined(ack);
      } else log("join failed: " + (ack && ack.error), "err");
    });
  };

  socket.on("connect", () => {
    const recovered = Boolean(socket.recovered);
    window.chat.connects.push({ id: socket.id, recovered });
    whoami();
    status();
    countMembers();  // what changed while it was away
    socket.io.engine.once("upgrade", status);
    if (window.chat.connects.length > 1) {
      if (recovered) {
        log("reconnected: session recovered, nothing was missed", "sys");
        banner("Reconnected: session recovered, nothing was missed", "ok");
      } else if (rooms.size) {
        log("reconnected as a new session: joining the rooms again", "err");
        banner("Reconnected as a new session: messages sent meanwhile may be missing", "warn");
        const was = room;
        for (const r of rooms.keys()) join(r, 0, () => { room = was; drawRooms(); });
      } else banner("Reconnected", "ok");
    }
  });
  socket.on("disconnect", (reason) => { status(); banner("Connection lost (" + reason + "): reconnecting…", "down"); });
  socket.on("connect_error", (err) => { banner("Cannot connect: " + err.message, "down"); });
  socket.on("chat", (msg) => {
    window.chat.messages.push(msg);
    show(msg);
  });

  $("name-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    try { localStorage.setItem("chat.name", $("name").value); } catch (e) { /* private mode */ }
    location.reload();  // a new name is a new connection
  });
  $("join-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    join($("room").value, 20, (ack) => {
      log("joined " + ack.room, "sys");
      for (const msg of ack.history || []) {
        window.chat.history.push(msg);
        show(msg, "sys", " (earlier)");
      }
    });
  });
  $("send-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("text").value;
    if (!room) { log("join a room first", "err"); return; }
    const to = room;
    socket.emit("chat", { room: to, text }, (ack) => {
      if (ack && ack.ok) { log("[" + to + "] me: " + text, "me"); $("text").value = ""; }
      else log("send failed: " + (ack && ack.error), "err");
    });
  });
})();
