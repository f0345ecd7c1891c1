import { expect, test } from "@playwright/test";
import { spawn, type ChildProcess } from "node:child_process";
import { SHOTS, createProduct, open, signIn } from "./helpers";

// An operator's whole upgrade in the console, with `updraft sim` devices doing the real MQTT + HTTPS
// flow: a product, simulated devices added to a group from the device list, a package uploaded with a
// progress bar, a task for the group watched live to the end, a device's detail, and a stopped task
// whose delete is refused while it runs.

const BIN = process.env.UPDRAFT_BIN ?? "";
const DATA = process.env.E2E_DATA_DIR ?? "";
const MQTT_PORT = process.env.E2E_MQTT_PORT ?? "";

/** `updraft sim mqtt` against the test's server; resolves its output when it exits. */
function simulate(args: string[]): { child: ChildProcess; done: Promise<string>; output: () => string } {
  const child = spawn(BIN, ["sim", "mqtt", "--port", MQTT_PORT, ...args], {
    env: { ...process.env, UPDRAFT_DATA_DIR: DATA, UPDRAFT_LOG__FORMAT: "text" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  child.stdout?.on("data", (d) => (out += d));
  child.stderr?.on("data", (d) => (out += d));
  const done = new Promise<string>((resolve) => child.on("exit", (code) => resolve(`exit ${code}\n${out}`)));
  return { child, done, output: () => out };
}

test("an operator upgrades a group live, inspects a device, and stops a task", async ({ page }) => {
  test.setTimeout(180_000);
  expect(BIN, "UPDRAFT_BIN (set by scripts/e2e.sh)").not.toBe("");
  const errors: string[] = [];
  page.on("pageerror", (e) => errors.push(e.message));
  let eventsBlocked = false;
  page.on("console", (m) => {
    // The refused delete below answers 409 on purpose, and the blocked event stream fails on purpose.
    const expected = m.text().includes("status of 409") || (eventsBlocked && m.text().includes("net::ERR_FAILED"));
    if (m.type() === "error" && !expected) errors.push(m.text());
  });
  await signIn(page);
  const stamp = Date.now().toString(36);
  const product = `e2eup${stamp}`;

  // A product for the simulated meters.
  await createProduct(page, product, "Smart meter");

  // Three simulated devices: registered by the simulator, online over MQTT, on software 1.0.
  const sim = simulate([
    "--devices", "3", "--prefix", `${product}-m`, "--product", product, "--register",
    "--sw-version", "1.0", "--exit-when-done", "--duration", "150s",
  ]);
  try {
    await expect(async () => {
      await page.goto(`/devices?product=${product}&status=ONLINE`);
      await expect(page.locator("#devices tbody tr")).toHaveCount(3, { timeout: 1_000 });
    }).toPass({ timeout: 30_000 });

    // A group, then the three devices added to it from the device list (multi-select).
    const group = `meters_${stamp}`;
    await open(page, "/groups");
    await page.locator("#group-form").getByLabel("Name").fill(group);
    await page.locator("#group-form").getByRole("button", { name: "Create group" }).click();
    await expect(page.locator("#groups")).toContainText(group);

    await open(page, `/devices?product=${product}`);
    await page.getByLabel("Select all on this page").check();
    const bar = page.locator("#selection-bar");
    await expect(bar).toContainText("3 selected");
    await bar.getByLabel("Group").selectOption({ label: group });
    await bar.getByRole("button", { name: "Add to group" }).click();
    await expect(page.locator("#added")).toHaveText("Added 3 devices.");
    await page.screenshot({ path: `${SHOTS}/devices-selection.png`, fullPage: true });
    await page.goto("/groups");
    await page.getByRole("link", { name: group }).click();
    await expect(page.locator("#members tbody tr")).toHaveCount(3);
    await page.screenshot({ path: `${SHOTS}/group.png`, fullPage: true });

    // A 6 MiB package, uploaded over a throttled link so the progress bar shows.
    await open(page, "/upgrades/packages");
    const upload = page.locator("#upload-form");
    await upload.getByLabel("Type").selectOption("softwarePackage");
    await upload.locator("select[name=product_id]").selectOption(product);
    await upload.getByLabel("Version", { exact: true }).fill("2.0");
    await upload.getByLabel(/Upgrades from/).fill("1.0");
    await upload.getByLabel("File").setInputFiles({
      name: "meter-2.0.bin", mimeType: "application/octet-stream", buffer: Buffer.alloc(6 * 1024 * 1024, 7),
    });
    const cdp = await page.context().newCDPSession(page);
    await cdp.send("Network.emulateNetworkConditions", {
      offline: false, latency: 0, downloadThroughput: -1, uploadThroughput: 2 * 1024 * 1024,
    });
    await upload.getByRole("button", { name: "Upload" }).click();
    await expect(page.locator("#upload-progress")).toBeVisible();
    await expect(page.locator("#upload-progress")).toContainText(/\d+% · [\d.]+ MiB of 6\.0 MiB/);
    await page.screenshot({ path: `${SHOTS}/package-uploading.png`, fullPage: true });
    await expect(page.locator("#upload-done")).toContainText("Uploaded version 2.0", { timeout: 30_000 });
    await cdp.send("Network.emulateNetworkConditions", {
      offline: false, latency: 0, downloadThroughput: -1, uploadThroughput: -1,
    });
    await expect(page.locator("#packages")).toContainText("6.0 MiB");
    await page.locator("#packages").getByRole("link", { name: "2.0" }).first().click();
    await expect(page.locator("#sha256")).toHaveText(/^[0-9a-f]{64}$/);
    await page.screenshot({ path: `${SHOTS}/package.png`, fullPage: true });

    // The task, for the group: the form counts the targets before it is created.
    await page.getByRole("link", { name: "Create task" }).click();
    await expect(page).toHaveURL(/\/upgrades\/new\?package=/);
    const form = page.locator("#task-form");
    await form.getByLabel("Task name").fill(`rollout_${stamp}`);
    await form.locator("select[name=group_id]").selectOption({ label: `${group} (3 devices)` });
    await expect(page.locator("#target-count")).toHaveText("3 devices of the package's product are in this group now.");
    await form.getByLabel("Retry failed devices").check();
    await expect(form.getByLabel("Attempts")).toHaveValue("2");
    await page.screenshot({ path: `${SHOTS}/task-new.png`, fullPage: true });
    await form.getByRole("button", { name: "Create now" }).click();
    await expect(page).toHaveURL(/\/upgrades\/tasks\/[0-9a-f]+$/);

    // Live: the page is not reloaded (the marker survives) while the counters reach 3 succeeded.
    await page.evaluate(() => ((window as unknown as { marker: number }).marker = 42));
    await expect(page.locator("#live")).toHaveText("Live");
    await expect(page.locator('#counters [data-status="Success"] .n'))
      .toHaveText("3", { timeout: 90_000 })
      .catch((e) => {
        // What the devices saw, for a run where they did not finish.
        console.log(`--- updraft sim output ---\n${sim.output()}`);
        throw e;
      });
    await expect(page.locator(".title-line .badge")).toHaveText("Success");
    expect(await page.evaluate(() => (window as unknown as { marker: number }).marker)).toBe(42);
    await page.screenshot({ path: `${SHOTS}/task-done.png`, fullPage: true });
    expect(await sim.done).toMatch(/^exit 0/);

    // One device's step history, then its detail page with the new version and the upgrade.
    const device = `${product}-m00000`;
    await page.locator("#task-devices").getByRole("link", { name: device }).click();
    await expect(page.locator("#history")).toContainText("Success");
    await page.locator("#history").getByRole("link", { name: "Device details" }).click();
    await expect(page).toHaveURL(new RegExp(`/devices/${device}$`));
    await expect(page.locator("#sw-version")).toHaveText("2.0");
    await expect(page.locator("#device-upgrades")).toContainText(`rollout_${stamp}`);
    await expect(page.locator("#device-facts")).toContainText(group);
    await page.screenshot({ path: `${SHOTS}/device.png`, fullPage: true });

    // A device that never connects keeps a task running: delete is refused until it is stopped.
    await open(page, "/devices");
    await page.locator("#register-toggle").click();
    const register = page.locator("#register-form");
    await register.locator("select[name=product_id]").selectOption(product);
    await register.getByLabel(/Node ID/).fill(`offline${stamp}`);
    await register.getByRole("button", { name: "Register" }).click();
    await expect(page.locator("#registered")).toBeVisible();
    // With the event stream blocked, the task page says so and refreshes every 5 s instead.
    eventsBlocked = true;
    await page.route("**/events**", (route) => route.abort());
    await open(page, "/upgrades/new");
    await form.getByLabel("Task name").fill(`stuck_${stamp}`);
    await form.locator("select[name=package_id]").selectOption({ index: 1 });
    await form.getByLabel("Devices by id").check();
    await form.getByLabel(/Device ids/).fill(`${product}_offline${stamp}`);
    await expect(page.locator("#target-count")).toHaveText("1 devices will be upgraded.");
    await form.getByRole("button", { name: "Create now" }).click();
    await expect(page).toHaveURL(/\/upgrades\/tasks\/[0-9a-f]+$/);
    await expect(page.locator(".title-line .badge")).toHaveText(/Processing|Waiting/);
    await page.locator("#delete-task").click();
    await expect(page.locator("#delete-error")).toContainText("stop it before deleting it");
    await page.screenshot({ path: `${SHOTS}/task-delete-refused.png`, fullPage: true });
    await expect(page.locator("#live")).toHaveText("Reconnecting; refreshing every 5 s");
    // Stopped by someone else (here: a direct server function call): the page catches up by polling.
    const taskId = page.url().split("/").pop() ?? "";
    const stopped = await page.request.post("/api/stop_task", {
      form: { task_id: taskId, device_ids: "" },
      headers: { origin: new URL(page.url()).origin, accept: "application/json" },
    });
    expect(stopped.status()).toBe(200);
    await expect(page.locator(".title-line .badge")).toHaveText("Stopped", { timeout: 12_000 });
    await page.unroute("**/events**");
    await open(page, page.url()); // a fresh stream, so nothing more fails
    eventsBlocked = false;
    await page.locator("#delete-task").click();
    await expect(page).toHaveURL(/\/upgrades$/);
    await expect(page.locator("#tasks")).toContainText(`rollout_${stamp}`);
    await expect(page.locator("#tasks")).not.toContainText(`stuck_${stamp}`);
    await page.screenshot({ path: `${SHOTS}/tasks.png`, fullPage: true });

    // Without JavaScript the task page is complete (server-rendered), and it fits a tablet.
    const noJs = await page.context().browser()!.newContext({ javaScriptEnabled: false, ignoreHTTPSErrors: true });
    await noJs.addCookies(await page.context().cookies());
    const plain = await noJs.newPage();
    await plain.setViewportSize({ width: 768, height: 1024 });
    await plain.goto("/upgrades");
    await plain.getByRole("link", { name: `rollout_${stamp}` }).click();
    await expect(plain.locator('#counters [data-status="Success"] .n')).toHaveText("3");
    await expect(plain.locator("#task-devices tbody tr")).toHaveCount(3);
    await plain.screenshot({ path: `${SHOTS}/task-tablet-nojs.png`, fullPage: true });
    await noJs.close();

    // Settings: an API credential, its SK shown once, then revoked.
    await open(page, "/settings");
    await page.locator("#credentials").getByLabel("Description").fill(`e2e_${stamp}`);
    await page.getByRole("button", { name: "Create credential" }).click();
    await expect(page.locator("#new-sk")).toHaveText(/^[A-Za-z0-9]{20,}$/);
    const ak = (await page.locator("#new-ak").textContent()) ?? "";
    const row = page.locator("#credential-list tr", { hasText: ak });
    await expect(row).toContainText("active");
    await page.screenshot({ path: `${SHOTS}/settings-credential.png`, fullPage: true });
    await row.getByRole("button", { name: "Revoke" }).click();
    await expect(row).toContainText("revoked");

    await open(page, "/api-reference");
    await expect(page.getByRole("heading", { name: "batchtasks" })).toBeVisible();
    await expect(page.locator("body")).toContainText("CreateBatchTask");
    await page.screenshot({ path: `${SHOTS}/api-reference.png`, fullPage: true });
  } finally {
    sim.child.kill("SIGINT");
  }
  expect(errors).toEqual([]);
});
