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
  const socket = io({ transports: ["websocket"] });
  let room = null;
  window.chat = { socket, joined: () => room, messages: [] };
  socket.on("connect", () => { $("status").textContent = "connected as " + socket.id; });
  socket.on("disconnect", (reason) => { $("status").textContent = "disconnected: " + reason; });
  socket.on("chat", (msg) => {
    window.chat.messages.push(msg);
    log("[" + msg.room + "] " + msg.from + ": " + msg.text);
  });
  $("join-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = $("room").value;
    socket.emit("join", name, (ack) => {
      if (ack && ack.ok) { room = ack.room; log("joined " + ack.room, "sys"); }
      else log("join failed: " + (ack && ack.error), "err");
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
