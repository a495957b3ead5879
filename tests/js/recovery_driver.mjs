// The official socket.io-client in its DEFAULT settings (polling, then upgrade to
// websocket; automatic reconnection), driven by a test one JSON object per line.
// stdin:  {"ref": n, "event": "join", "args": [...]}  -> emits with an ack callback
// stdout: {"type": "connect", "sid", "recovered", "transport"}
//         {"type": "ack", "ref": n, "data": ...}
//         {"type": "event", "event": name, "args": [every argument, the offset included]}
//         {"type": "disconnect", "reason"} / {"type": "connect_error", "message"}
import { createInterface } from "node:readline";
import { io } from "socket.io-client";

const url = process.argv[2];
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const socket = io(url, { reconnectionDelay: 300, reconnectionDelayMax: 1000,
                         randomizationFactor: 0 });

socket.on("connect", () => out({ type: "connect", sid: socket.id, recovered: socket.recovered,
                                 transport: socket.io.engine.transport.name }));
socket.on("disconnect", (reason) => out({ type: "disconnect", reason }));
socket.on("connect_error", (err) => out({ type: "connect_error", message: err.message }));
socket.onAny((event, ...args) => out({ type: "event", event, args }));

createInterface({ input: process.stdin }).on("line", (line) => {
  const cmd = JSON.parse(line);
  socket.timeout(10000).emit(cmd.event, ...cmd.args, (err, data) => {
    out({ type: "ack", ref: cmd.ref, data: err ? { ok: false, error: "client timeout" } : data });
  });
}).on("close", () => { socket.close(); process.exit(0); });
