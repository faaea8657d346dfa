// Drives the dashboard of a running `talon up` in Debian's Chromium,
// headless, and prints what it saw as one JSON line. tests/it/dashboard.rs
// starts talon up, runs this, and checks the result against the admin API.
//
// Environment: PLAYWRIGHT_CORE (the module's folder), TALON_URL (the HTTP
// endpoint), TALON_VIEWER_KEY (what the page is opened with), TALON_KEY
// (an admin key: the requests and the drain), TALON_BIN (the talon CLI),
// TALON_GRPC (its --endpoints), TALON_EXPECT_NODES (how many hosts the
// fleet has), TALON_DRAIN (a node to drain), TALON_ARTIFACTS (where
// screenshots go), TALON_REQUESTS (how many requests to send),
// TALON_AUTOSCALED (an autoscaled model, also sent requests, whose
// forecast panel is read).

const { chromium } = require(process.env.PLAYWRIGHT_CORE);
const { execFileSync } = require("node:child_process");
const path = require("node:path");
const fs = require("node:fs");

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const url = env("TALON_URL");
const key = env("TALON_KEY");
const viewerKey = env("TALON_VIEWER_KEY");
const expectedNodes = Number(env("TALON_EXPECT_NODES"));
const drain = env("TALON_DRAIN");
const artifacts = env("TALON_ARTIFACTS");
const requests = Number(process.env.TALON_REQUESTS ?? "20");
const autoscaled = env("TALON_AUTOSCALED");
const WAIT_MS = 30_000;

async function shot(page, name) {
  const file = path.join(artifacts, name);
  await page.screenshot({ path: file, fullPage: true });
  return file;
}

async function main() {
  fs.mkdirSync(artifacts, { recursive: true });
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const consoleErrors = [];
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  const seen = { screenshots: [] };
  try {
    // 1. without a key the page asks for one
    await page.goto(url + "/");
    await page.waitForSelector("#login:not([hidden])", { timeout: WAIT_MS });
    seen.asked_for_key = true;
    // a wrong key is refused with the coordinator's reason
    // the reason shown for the missing key, then the one for the wrong key
    const before = await page.textContent("#login-problem");
    await page.fill("#key", "talon_0000000000000000_" + "0".repeat(64));
    await page.click("#login button");
    await page.waitForFunction(
      (old) => {
        const text = document.getElementById("login-problem").textContent;
        return text.length > 0 && text !== old;
      },
      before,
      { timeout: WAIT_MS },
    );
    seen.wrong_key_message = await page.textContent("#login-problem");
    await page.fill("#key", viewerKey);
    await page.click("#login button");

    // 2. the fleet: every host and GPU
    await page.waitForFunction((n) => document.querySelectorAll("[data-node]").length === n, expectedNodes, { timeout: WAIT_MS });
    seen.nodes = await page.$$eval("[data-node]", (els) => els.map((e) => ({ id: e.dataset.node, state: e.dataset.nodeState })));
    seen.gpus = await page.$$eval("[data-gpu]", (els) => els.map((e) => ({ id: e.dataset.gpu, type: e.dataset.gpuType })));
    seen.mig_slices = await page.$$eval("[data-slice]", (els) => els.map((e) => e.closest("[data-mig]").dataset.mig + ":" + e.dataset.slice));
    seen.placements = await page.$$eval("[data-placement]", (els) => els.map((e) => e.textContent));
    seen.screenshots.push(await shot(page, "fleet.png"));

    // the page is never reloaded from here on
    await page.evaluate(() => { window.__sameDocument = true; });

    // 3. traffic: requests sent now show in the chart
    for (let i = 0; i < requests; i++) {
      for (const model of ["demo", autoscaled]) {
        const r = await fetch(url + "/v1/chat/completions", {
          method: "POST",
          headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
          body: JSON.stringify({ model, messages: [{ role: "user", content: `hello ${i}` }], max_tokens: 4 }),
        });
        if (r.status !== 200) throw new Error(`request ${i} to ${model} answered ${r.status}: ${await r.text()}`);
      }
    }
    await page.waitForFunction(
      (n) => {
        const chart = document.querySelector('[data-chart="demo"]');
        const line = chart?.querySelector('polyline[data-series="requests"]');
        return chart && Number(chart.dataset.requests) >= n && Number(line?.dataset.sum) >= n;
      },
      requests,
      { timeout: WAIT_MS },
    );
    seen.chart_requests = await page.$eval('[data-chart="demo"]', (e) => Number(e.dataset.requests));
    seen.chart_points = await page.$eval('[data-chart="demo"] polyline[data-series="requests"]', (e) => e.getAttribute("points").trim().split(/\s+/).length);
    seen.figures = await page.$eval('[data-chart="demo"] .figures', (e) => e.textContent);
    seen.screenshots.push(await shot(page, "traffic.png"));

    // the autoscaled model's panel: its observed demand and a forecast
    // ahead of it, with the SLO judged on the requests just sent
    await page.waitForFunction(
      (m) => {
        const card = document.querySelector(`[data-forecast="${m}"]`);
        const sum = (name) => Number(card?.querySelector(`polyline[data-series="${name}"]`)?.dataset.sum ?? 0);
        return sum("observed") > 0 && card.querySelector('polyline[data-series="forecast"]').getAttribute("points").trim() !== "" && card.textContent.includes("met the SLO");
      },
      autoscaled,
      { timeout: 60_000 },
    );
    seen.forecast = await page.$eval(`[data-forecast="${autoscaled}"]`, (card) => ({
      method: card.dataset.method,
      desired: Number(card.dataset.desired),
      observed_sum: Number(card.querySelector('polyline[data-series="observed"]').dataset.sum),
      forecast_points: card.querySelector('polyline[data-series="forecast"]').getAttribute("points").trim().split(/\s+/).length,
      upper_points: card.querySelector('polyline[data-series="upper band"]').getAttribute("points").trim().split(/\s+/).length,
      text: card.textContent,
    }));
    seen.screenshots.push(await shot(page, "forecast.png"));

    // 4. a drained node changes state on the page, without a reload
    execFileSync(env("TALON_BIN"), ["--endpoints", env("TALON_GRPC"), "node", "drain", drain], {
      env: { ...process.env, TALON_KEY: key },
      stdio: ["ignore", "pipe", "pipe"],
    });
    await page.waitForFunction(
      (id) => document.querySelector(`[data-node="${id}"]`)?.dataset.nodeState === "draining",
      drain,
      { timeout: WAIT_MS },
    );
    seen.drained_state = await page.$eval(`[data-node="${drain}"]`, (e) => e.dataset.nodeState);
    seen.same_document = await page.evaluate(() => window.__sameDocument === true);
    seen.audit_actions = await page.$$eval("[data-audit] td:nth-child(4)", (els) => els.map((e) => e.textContent));
    seen.updates = Number(await page.evaluate(() => document.body.dataset.updates));
    seen.screenshots.push(await shot(page, "drained.png"));
    seen.console_errors = consoleErrors;
    console.log(JSON.stringify(seen));
  } catch (e) {
    try {
      seen.screenshots.push(await shot(page, "failure.png"));
    } catch {}
    console.error(`dashboard check failed: ${e.stack ?? e}\nseen so far: ${JSON.stringify(seen)}\nconsole: ${consoleErrors.join("\n")}`);
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
}

main();
