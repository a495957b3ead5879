// Drives the official socket.io-client from a test, one JSON object per line.
// stdin:  {"ref": n, "event": "join", "args": [...]}   -> emits with an ack callback
// stdout: {"type": "connect", "sid": ..., "recovered": bool (connection state recovery)}
//         {"type": "ack", "ref": n, "data": ...}
//         {"type": "event", "event": name, "data": first argument}
//         {"type": "disconnect", "reason": ...} / {"type": "connect_error", "message": ...}
//         {"type": "upgrade", "transport": name} (the engine.io transport switched)
// argv: url [auth JSON] [io() options JSON, e.g. {"transports": ["polling", "websocket"]}]
import { createInterface } from "node:readline";
import { io } from "socket.io-client";

const url = process.argv[2];
const auth = process.argv[3] ? JSON.parse(process.argv[3]) : undefined;
const options = process.argv[4] ? JSON.parse(process.argv[4]) : {};
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const socket = io(url, { transports: ["websocket"], reconnection: false, auth, ...options });
socket.io.on("open", () => {
  socket.io.engine.on("upgrade", (transport) => out({ type: "upgrade", transport: transport.name }));
});

socket.on("connect", () => out({ type: "connect", sid: socket.id, recovered: socket.recovered }));
socket.on("disconnect", (reason) => out({ type: "disconnect", reason }));
socket.on("connect_error", (err) => out({ type: "connect_error", message: err.message, data: err.data ?? null }));
socket.onAny((event, ...args) => {
  const last = args[args.length - 1];
  if (typeof last === "function") {
    // a server-side call(): answer with what we got, so the test sees the round trip
    last({ echo: args[0] ?? null, from: "node" });
    args = args.slice(0, -1);
  }
  out({ type: "event", event, data: args.length ? args[0] : null });
});

createInterface({ input: process.stdin }).on("line", (line) => {
  const cmd = JSON.parse(line);
  socket.timeout(10000).emit(cmd.event, ...cmd.args, (err, data) => {
    out({ type: "ack", ref: cmd.ref, data: err ? { ok: false, error: "client timeout" } : data });
  });
}).on("close", () => { socket.close(); process.exit(0); });
