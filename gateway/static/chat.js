// The chat page: join a room, send, see messages. Uses the official socket.io-client.
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
  if (typeof io === "undefined") {
    $("status").textContent = "socket.io-client is not installed on this gateway (run npm ci)";
    return;
  }
  // socket.io-client's defaults: polling first, then the upgrade to websocket; with a
  // gateway running --recovery, a reconnect within the window restores the session
  const socket = io();
  let room = null;
  window.chat = { socket, joined: () => room, messages: [], history: [], connects: [] };
  socket.on("connect", () => {
    window.chat.connects.push({ id: socket.id, recovered: Boolean(socket.recovered) });
    $("status").textContent = "connected as " + socket.id;
    if (window.chat.connects.length > 1) {
      if (socket.recovered) log("reconnected: session recovered, nothing was missed", "sys");
      else log("reconnected as a new session: join again", "err");
    }
  });
  socket.on("disconnect", (reason) => { $("status").textContent = "disconnected: " + reason; });
  socket.on("chat", (msg) => {
    window.chat.messages.push(msg);
    log("[" + msg.room + "] " + msg.from + ": " + msg.text);
  });
  $("join-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = $("room").value;
    // ask for the room's recent messages (kept by gateways running --recovery)
    socket.emit("join", { room: name, history: 20 }, (ack) => {
      if (ack && ack.ok) {
        room = ack.room;
        log("joined " + ack.room, "sys");
        for (const msg of ack.history || []) {
          window.chat.history.push(msg);
          log("[" + msg.room + "] " + msg.from + ": " + msg.text + " (earlier)", "sys");
        }
      } else log("join failed: " + (ack && ack.error), "err");
    });
  });
  $("send-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("text").value;
    if (!room) { log("join a room first", "err"); return; }
    socket.emit("chat", { room, text }, (ack) => {
      if (ack && ack.ok) { log("[" + room + "] me: " + text, "me"); $("text").value = ""; }
      else log("send failed: " + (ack && ack.error), "err");
    });
  });
})();
