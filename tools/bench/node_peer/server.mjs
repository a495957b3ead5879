// The benchmark's Node peer: socket.io 4.8 with @socket.io/redis-adapter in sharded
// mode (createShardedAdapter on a Redis 7 Cluster, the `redis` v4 cluster client, as
// the adapter's documentation shows), serving the gateway's chat protocol
// (gateway/chat.py) as far as the benchmark's load generator uses it:
//
//   join(room)            -> {ok: true, room}   | {ok: false, error}
//   leave(room)           -> {ok: true, room}
//   chat({room, text})    -> {ok: true, id}     | {ok: false, error}; every OTHER member
//                            of the room, on any node, gets "chat" {room, text, from, id, ts}
//   any other event       -> {ok: false, error}
//
// with the gateway's default limits (room 1..128 characters, text up to 8 KiB,
// 100 rooms per socket). It is a yardstick, not a product: no auth, no rate limits
// (the bench raises the gateway's out of the way too).
//
// GET /healthz answers 200 once both Redis clients are connected; GET /metrics
// exports, in the gateway's metric names, what the adapter received from Redis and
// published, so the benchmark reads every system the same way.
//
// Usage: node server.mjs --port P --node-id ID --redis-url redis://h:p [--redis-url ...]
//        [--host 127.0.0.1]

import http from "node:http";
import { randomBytes } from "node:crypto";
import { parseArgs } from "node:util";
import { Server } from "socket.io";
import { createCluster } from "redis";
import { createShardedAdapter } from "@socket.io/redis-adapter";

const MAX_ROOM_CHARS = 128;
const MAX_TEXT_BYTES = 8 * 1024;
const MAX_ROOMS = 100;
// socket.io-adapter's MessageType.BROADCAST
const BROADCAST = 3;

const { values: opts } = parseArgs({
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string" },
    "node-id": { type: "string", default: "node-peer" },
    "redis-url": { type: "string", multiple: true },
  },
});
if (!opts.port || !opts["redis-url"]?.length) {
  console.error("usage: server.mjs --port P --redis-url redis://host:port [--redis-url ...]");
  process.exit(2);
}

const counters = {
  gateway_broker_messages_received_total: 0,
  gateway_broker_bytes_received_total: 0,
  gateway_broker_messages_published_total: 0,
  gateway_broker_messages_echo_total: 0,
  gateway_broker_messages_unwanted_total: 0,
  gateway_cluster_messages_received_total: 0,
  gateway_broker_subscribe_ops_total: 0,
  gateway_broker_unsubscribe_ops_total: 0,
};

const pubClient = createCluster({ rootNodes: opts["redis-url"].map((url) => ({ url })) });
const subClient = pubClient.duplicate();
for (const client of [pubClient, subClient]) {
  client.on("error", (err) => console.error(`redis: ${err.message}`));
}
await Promise.all([pubClient.connect(), subClient.connect()]);

// The adapter subscribes a room's shard channel when the room appears on this node
// but does not wait for Redis to confirm; the join's ack waits for it (as the
// gateway's does), or the first messages from other nodes would race the SSUBSCRIBE.
const pending = new Map();
const sSubscribe = subClient.sSubscribe.bind(subClient);
const sUnsubscribe = subClient.sUnsubscribe.bind(subClient);
subClient.sSubscribe = (channel, ...rest) => {
  counters.gateway_broker_subscribe_ops_total += 1;
  const done = sSubscribe(channel, ...rest);
  pending.set(channel, done);
  done.catch((err) => console.error(`SSUBSCRIBE ${channel}: ${err.message}`))
    .finally(() => { if (pending.get(channel) === done) pending.delete(channel); });
  return done;
};
subClient.sUnsubscribe = (channel, ...rest) => {
  counters.gateway_broker_unsubscribe_ops_total += 1;
  return sUnsubscribe(channel, ...rest);
};

const httpServer = http.createServer((req, res) => {
  if (req.url === "/healthz") {
    const ok = pubClient.isOpen && subClient.isOpen;
    res.writeHead(ok ? 200 : 503, { "content-type": "application/json" });
    res.end(JSON.stringify({ status: ok ? "ok" : "redis down", node: opts["node-id"] }));
  } else if (req.url === "/metrics") {
    res.writeHead(200, { "content-type": "text/plain; version=0.0.4" });
    res.end(Object.entries(counters).map(([k, v]) => `${k} ${v}`).join("\n") + "\n");
  } else if (!req.url.startsWith("/socket.io/")) {
    res.writeHead(404);
    res.end();
  }
});

const io = new Server(httpServer, { adapter: createShardedAdapter(pubClient, subClient) });
const nsp = io.of("/");
const adapter = nsp.adapter;

// count what Redis hands the adapter, as the gateway's manager counts it
const onRawMessage = adapter.onRawMessage.bind(adapter);
adapter.onRawMessage = (raw, channel) => {
  counters.gateway_broker_messages_received_total += 1;
  counters.gateway_broker_bytes_received_total += raw.length;
  return onRawMessage(raw, channel);
};
const onMessage = adapter.onMessage.bind(adapter);
adapter.onMessage = (message, offset) => {
  if (message.uid === adapter.uid) {
    counters.gateway_broker_messages_echo_total += 1;
  } else if (message.type === BROADCAST) {
    const rooms = message.data?.opts?.rooms ?? [];
    if (rooms.length && !rooms.some((room) => adapter.rooms.get(room)?.size)) {
      counters.gateway_broker_messages_unwanted_total += 1;
    }
  } else {
    counters.gateway_cluster_messages_received_total += 1;
  }
  return onMessage(message, offset);
};
const doPublish = adapter.doPublish.bind(adapter);
adapter.doPublish = (message) => {
  counters.gateway_broker_messages_published_total += 1;
  return doPublish(message);
};

const refuse = (error) => ({ ok: false, error });

function roomProblem(args) {
  if (args.length !== 1) return `expected one argument, the room name; got ${args.length}`;
  const room = args[0];
  if (typeof room !== "string") return "room must be a string";
  if (!room) return "room must not be empty";
  if (room.length > MAX_ROOM_CHARS) return `room name longer than ${MAX_ROOM_CHARS} characters`;
  if (io.of("/").sockets.has(room)) return "room name is reserved (a socket id)";
  return null;
}

// the trailing function of a request is its ack; anything else is the arguments
function split(args) {
  const ack = typeof args.at(-1) === "function" ? args.pop() : () => {};
  return [args, ack];
}

nsp.on("connection", (socket) => {
  socket.on("join", async (...raw) => {
    const [args, ack] = split(raw);
    const problem = roomProblem(args);
    if (problem) return ack(refuse(problem));
    const room = args[0];
    // socket.rooms holds the socket's own id room too
    if (!socket.rooms.has(room) && socket.rooms.size - 1 >= MAX_ROOMS) {
      return ack(refuse(`too many rooms (at most ${MAX_ROOMS})`));
    }
    await socket.join(room);
    const subscribing = pending.get(adapter.dynamicChannel(room));
    if (subscribing) {
      try {
        await subscribing;
      } catch (err) {
        await socket.leave(room);
        return ack(refuse(`room unavailable: ${err.message}`));
      }
    }
    ack({ ok: true, room });
  });

  socket.on("leave", async (...raw) => {
    const [args, ack] = split(raw);
    const problem = roomProblem(args);
    if (problem) return ack(refuse(problem));
    await socket.leave(args[0]);
    ack({ ok: true, room: args[0] });
  });

  socket.on("chat", (...raw) => {
    const [args, ack] = split(raw);
    const body = args[0];
    if (args.length !== 1 || typeof body !== "object" || body === null || Array.isArray(body)) {
      return ack(refuse('chat takes one object: {"room": str, "text": str}'));
    }
    const problem = roomProblem([body.room]);
    if (problem) return ack(refuse(problem));
    if (typeof body.text !== "string") return ack(refuse("text must be a string"));
    if (Buffer.byteLength(body.text) > MAX_TEXT_BYTES) {
      return ack(refuse(`text longer than ${MAX_TEXT_BYTES} bytes`));
    }
    if (!socket.rooms.has(body.room)) {
      return ack(refuse(`not a member of room ${JSON.stringify(body.room)}; join it first`));
    }
    const id = randomBytes(8).toString("hex");
    // socket.to() leaves out the sender (by its own id room), on every node
    socket.to(body.room).emit("chat", { room: body.room, text: body.text, from: socket.id, id,
                                        ts: Date.now() });
    ack({ ok: true, id });
  });

  socket.onAny((event, ...raw) => {
    if (event === "join" || event === "leave" || event === "chat") return;
    split(raw)[1](refuse(`unknown event ${JSON.stringify(String(event).slice(0, 32))}`));
  });
});

function stop() {
  io.close();
  Promise.allSettled([pubClient.quit(), subClient.quit()]).finally(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

httpServer.listen(Number(opts.port), opts.host, () => {
  console.log(`node peer ${opts["node-id"]} listening on http://${opts.host}:${opts.port}`);
});
