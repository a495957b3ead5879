// Headless Chromium on the chat page (socket.io-client's defaults: polling, then the
// upgrade), driven by a test one command per line, one JSON answer per line.
// usage: node browser_page.mjs <page url> <chromium path>
// stdout: {"ready": true, "id": socket id} once the page is connected
// stdin:  {"join": room}   -> {"joined": room}            (the page's join form)
//         {"send": text}   -> {"sent": text}              (its send form, acked)
//         {"upgraded": true} -> {"transport": name}       (once on websocket)
//         {"look": true}   -> {connects, messages, log, errors, transport}
// Any failure prints {"errors": [...]} and exits non-zero.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const [pageUrl, executablePath] = process.argv.slice(2);
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const browser = await chromium.launch({
  executablePath, headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const errors = [];
let code = 0;
try {
  const page = await browser.newPage();
  page.on("pageerror", (err) => errors.push(String(err)));
  await page.goto(pageUrl + "/");
  await page.waitForFunction(() => window.chat && window.chat.socket.connected, null, { timeout: 15000 });
  out({ ready: true, id: await page.evaluate(() => window.chat.socket.id) });
  for await (const line of createInterface({ input: process.stdin })) {
    const cmd = JSON.parse(line);
    if (cmd.join !== undefined) {
      await page.fill("#room", cmd.join);
      await page.click("#join");
      await page.waitForFunction((r) => window.chat.joined() === r, cmd.join, { timeout: 15000 });
      out({ joined: cmd.join });
    } else if (cmd.send !== undefined) {
      await page.fill("#text", cmd.send);
      await page.click("#send");
      // the page logs its own message once the gateway acked it
      await page.waitForFunction((t) => Array.from(document.querySelectorAll("#log p.me"))
        .some((p) => p.textContent.endsWith("me: " + t)), cmd.send, { timeout: 15000 });
      out({ sent: cmd.send });
    } else if (cmd.upgraded) {
      await page.waitForFunction(() => window.chat.socket.io.engine.transport.name === "websocket",
                                 null, { timeout: 15000 });
      out({ transport: "websocket" });
    } else if (cmd.look) {
      out({
        ...(await page.evaluate(() => ({
          connects: window.chat.connects, messages: window.chat.messages,
          transport: window.chat.socket.io.engine.transport.name,
          connected: window.chat.socket.connected,
          log: Array.from(document.querySelectorAll("#log p")).map((p) => [p.className, p.textContent]),
        }))),
        errors,
      });
    }
  }
} catch (err) {
  out({ errors: [...errors, String(err && err.stack || err)] });
  code = 1;
} finally {
  await browser.close();
}
process.exit(code);
