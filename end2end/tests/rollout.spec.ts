import { expect, test } from "@playwright/test";
import { spawn } from "node:child_process";
import { SHOTS, createProduct, open, signIn } from "./helpers";

// A safe rollout from the console: a task in waves whose canary fails pauses with the reason shown and
// nothing started beyond it; Resume accepts the wave and the next one runs (and pauses in turn).

const BIN = process.env.UPDRAFT_BIN ?? "";
const DATA = process.env.E2E_DATA_DIR ?? "";
const MQTT_PORT = process.env.E2E_MQTT_PORT ?? "";

test("a task in waves pauses when its canary fails, and resumes from the console", async ({ page }) => {
  test.setTimeout(150_000);
  expect(BIN, "UPDRAFT_BIN (set by scripts/e2e.sh)").not.toBe("");
  const errors: string[] = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("console", (m) => {
    if (m.type() === "error") errors.push(m.text());
  });
  await signIn(page);
  const stamp = Date.now().toString(36);
  const product = `e2ewave${stamp}`;

  await createProduct(page, product, "Canary meter");

  // Four simulated devices that refuse every upgrade.
  const sim = spawn(BIN, [
    "sim", "mqtt", "--port", MQTT_PORT, "--devices", "4", "--prefix", `${product}-r`, "--product", product,
    "--register", "--sw-version", "1.0", "--behaviour", "refuse", "--duration", "120s",
  ], { env: { ...process.env, UPDRAFT_DATA_DIR: DATA, UPDRAFT_LOG__FORMAT: "text" }, stdio: "ignore" });
  try {
    await expect(async () => {
      await page.goto(`/devices?product=${product}&status=ONLINE`);
      await expect(page.locator("#devices tbody tr")).toHaveCount(4, { timeout: 1_000 });
    }).toPass({ timeout: 30_000 });

    await open(page, "/upgrades/packages");
    const upload = page.locator("#upload-form");
    await upload.getByLabel("Type").selectOption("softwarePackage");
    await upload.locator("select[name=product_id]").selectOption(product);
    await upload.getByLabel("Version", { exact: true }).fill("2.0");
    await upload.getByLabel(/Upgrades from/).fill("1.0");
    await upload.getByLabel("File").setInputFiles({
      name: "canary-2.0.bin", mimeType: "application/octet-stream", buffer: Buffer.alloc(64 * 1024, 3),
    });
    await upload.getByRole("button", { name: "Upload" }).click();
    await expect(page.locator("#upload-done")).toContainText("Uploaded version 2.0", { timeout: 30_000 });
    await page.locator("#packages").getByRole("link", { name: "2.0" }).first().click();
    await page.getByRole("link", { name: "Create task" }).click();

    // The task: one canary, then one more, then the rest; a wave pauses at its first failure.
    const form = page.locator("#task-form");
    await form.getByLabel("Task name").fill(`waves_${stamp}`);
    await form.getByLabel("Devices by id").check();
    const ids = [0, 1, 2, 3].map((i) => `${product}-r0000${i}`);
    await form.getByLabel(/Device ids/).fill(ids.join("\n"));
    const rollout = page.locator("#rollout-fields");
    await rollout.getByLabel(/Waves/).fill("1, 1");
    await rollout.getByLabel("Pause when a wave has more failures than").fill("0");
    await page.screenshot({ path: `${SHOTS}/task-new-waves.png`, fullPage: true });
    await form.getByRole("button", { name: "Create now" }).click();
    await expect(page).toHaveURL(/\/upgrades\/tasks\/[0-9a-f]+$/);

    // Live: it pauses, says why, and nothing beyond the canary started.
    await expect(page.locator(".title-line .badge")).toHaveText("Paused", { timeout: 30_000 });
    await expect(page.locator("#pause-reason")).toContainText("wave 1 error threshold: 1 device failed, more than the 0 allowed");
    const waves = page.locator("#waves tbody tr");
    await expect(waves).toHaveCount(3);
    await expect(waves.nth(0).locator("td").nth(7)).toHaveText("1");
    await expect(waves.nth(1).locator("td").nth(4)).toHaveText("1"); // not started
    await expect(waves.nth(2).locator("td").nth(4)).toHaveText("2");
    await page.screenshot({ path: `${SHOTS}/task-paused.png`, fullPage: true });

    // Resume: the canary's wave is accepted, the second wave starts, fails, and pauses the task again.
    await page.locator("#resume-task").click();
    await expect(page.locator("#pause-reason")).toContainText("wave 2 error threshold", { timeout: 30_000 });
    await expect(waves.nth(1).locator("td").nth(7)).toHaveText("1");
    await expect(waves.nth(2).locator("td").nth(4)).toHaveText("2");

    // The audit log has the resume under the operator.
    await open(page, "/settings/audit?resource_type=batchtasks");
    await expect(page.locator("#audit-list")).toContainText("console resume_task");
    expect(errors).toEqual([]);
  } finally {
    sim.kill("SIGTERM");
  }
});
