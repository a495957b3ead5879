// Headless Chromium on the chat page (socket.io-client's defaults), reached through a
// front the test controls. Prints {"ready": true} once the page has joined the room,
// then, on a line from stdin ({"messages": n}), waits until the page has reconnected
// and shown n chats, and prints what it saw.
// usage: node browser_recovery.mjs <page url> <room> <chromium path>
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const [pageUrl, room, executablePath] = process.argv.slice(2);
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const browser = await chromium.launch({
  executablePath, headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const errors = [];
try {
  const page = await browser.newPage();
  page.on("pageerror", (err) => errors.push(String(err)));
  await page.goto(pageUrl + "/");
  await page.waitForFunction(() => window.chat && window.chat.socket.connected, null, { timeout: 15000 });
  await page.fill("#room", room);
  await page.click("#join");
  await page.waitForFunction((r) => window.chat.joined() === r, room, { timeout: 15000 });
  out({ ready: true, id: await page.evaluate(() => window.chat.socket.id) });
  const lines = createInterface({ input: process.stdin });
  let expected = 0;
  for await (const line of lines) {  // the test says when to look, and how many chats
    expected = JSON.parse(line).messages;
    break;
  }
  await page.waitForFunction(() => window.chat.connects.length >= 2 && window.chat.socket.connected,
                             null, { timeout: 30000 });
  await page.waitForFunction((n) => window.chat.messages.length >= n, expected, { timeout: 30000 })
    .catch(() => {});  // what is missing shows in the messages
  await page.waitForTimeout(400);  // a window in which no copy may arrive (not a wait)
  const seen = await page.evaluate(() => ({
    connects: window.chat.connects, messages: window.chat.messages,
    log: Array.from(document.querySelectorAll("#log p")).map((p) => p.textContent),
    banner: [document.querySelector("#banner").textContent, document.querySelector("#banner").className],
  }));
  seen.bannerVisible = await page.isVisible("#banner");
  if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT });
  out({ ...seen, errors });
} catch (err) {
  out({ errors: [...errors, String(err && err.stack || err)] });
} finally {
  await browser.close();
}
