// Headless Chromium loads the chat page from one gateway and chats with a Node.js
// socket.io-client on another gateway. Prints one JSON line with what each side saw;
// exits non-zero on any failure. Once both have joined it prints {"joined": room} and
// waits for a line on stdin before the chats.
// usage: node browser_chat.mjs <page gateway url> <other gateway url> <room> <chromium path>
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";
import { io } from "socket.io-client";

const [pageUrl, otherUrl, room, executablePath] = process.argv.slice(2);
const withTimeout = (promise, ms, what) => Promise.race([
  promise,
  new Promise((_, reject) => setTimeout(() => reject(new Error("timeout: " + what)), ms)),
]);

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const node = io(otherUrl, { transports: ["websocket"], reconnection: false, auth: { name: "bob" } });
const result = { page: [], node: [], errors: [] };
try {
  const page = await browser.newPage();
  page.on("pageerror", (err) => result.errors.push(String(err)));
  await page.addInitScript(() => localStorage.setItem("chat.name", "alice"));
  await page.goto(pageUrl + "/");
  await page.waitForFunction(() => window.chat && window.chat.socket.connected, null, { timeout: 10000 });
  await page.fill("#room", room);
  await page.click("#join");
  await page.waitForFunction((r) => window.chat.joined() === r, room, { timeout: 10000 });

  if (!node.connected) {
    await withTimeout(new Promise((resolve) => node.once("connect", resolve)), 10000, "node connect");
  }
  node.on("chat", (msg) => result.node.push(msg));
  const joinAck = await node.timeout(5000).emitWithAck("join", room);
  if (!joinAck.ok) throw new Error("node join failed: " + JSON.stringify(joinAck));
  // the test says when the NATS servers have learnt both gateways' interest
  process.stdout.write(JSON.stringify({ joined: room }) + "\n");
  for await (const _ of createInterface({ input: process.stdin })) break;

  const sendAck = await node.timeout(5000).emitWithAck("chat", { room, text: "hello browser" });
  if (!sendAck.ok) throw new Error("node chat failed: " + JSON.stringify(sendAck));
  await page.waitForFunction(() => window.chat.messages.length >= 1, null, { timeout: 10000 });
  await page.waitForSelector("#log >> text=hello browser", { timeout: 10000 });

  await page.fill("#text", "hello node");
  await page.click("#send");
  await withTimeout((async () => { while (result.node.length < 1) await new Promise((r) => setTimeout(r, 20)); })(),
                    10000, "browser message at the node client");
  result.page = await page.evaluate(() => window.chat.messages);
  result.pageId = await page.evaluate(() => window.chat.socket.id);
  result.nodeId = node.id;
  // the room list counts both members (one on each gateway); the status names the
  // page's gateway once whoami answered
  await page.waitForSelector(`#rooms li[data-room="${room}"] .count >> text=2`, { timeout: 10000 });
  await page.waitForFunction(() => window.chat.node !== null, null, { timeout: 10000 });
  result.shown = await page.evaluate(() => ({
    status: document.querySelector("#status").textContent,
    rooms: Array.from(document.querySelectorAll("#rooms li")).map(
      (li) => [li.dataset.room, li.querySelector(".count").textContent, li.className]),
    log: Array.from(document.querySelectorAll("#log p")).map((p) => [p.className, p.textContent]),
  }));
  if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT });
} catch (err) {
  result.errors.push(String(err && err.stack || err));
} finally {
  node.close();
  await browser.close();
}
process.stdout.write(JSON.stringify(result) + "\n");
process.exit(result.errors.length ? 1 : 0);
