import { expect, test, type Page } from "@playwright/test";
import { PASSWORD, SHOTS, signIn } from "./helpers";

/** Resolves once the hydrate bundle has been fetched. */
function wasmLoaded(page: Page) {
  return page.waitForResponse((r) => /\/pkg\/updraft(_bg)?\.wasm$/.test(r.url()) && r.ok());
}

test("pages need a session and the login page works without JavaScript", async ({ browser }) => {
  const context = await browser.newContext({ javaScriptEnabled: false, ignoreHTTPSErrors: true });
  const page = await context.newPage();
  await page.goto("/devices");
  await expect(page).toHaveURL(/\/login\?next=\/devices$/);
  await expect(page.getByRole("heading", { name: "Updraft" })).toBeVisible();

  await page.getByLabel("User name").fill("admin");
  await page.getByLabel("Password").fill("not the password");
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByRole("alert")).toHaveText("Wrong user name or password.");

  await page.getByLabel("User name").fill("admin");
  await page.getByLabel("Password").fill(PASSWORD);
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page).toHaveURL(/\/devices$/);
  // Server-rendered: heading, navigation and the device list are there without any script.
  await expect(page.getByRole("heading", { name: "Devices", level: 1 })).toBeVisible();
  await expect(page.getByRole("navigation", { name: "Main" }).getByRole("link", { name: "Upgrade tasks" })).toBeVisible();
  // The page's data too: the server waits for it (no script places streamed parts).
  await expect(page.locator("#devices, #devices-empty").first()).toBeVisible();
  await expect(page.getByText("Loading devices…")).toHaveCount(0);
  // The register button needs hydration, so without JavaScript it does nothing.
  await page.locator("#register-toggle").click();
  await expect(page.locator("#register-form")).toBeHidden();
  await context.close();
});

test("the hydrated console creates a product and registers a device through server functions", async ({ page }) => {
  const errors: string[] = [];
  page.on("pageerror", (e) => errors.push(e.message));
  // Console errors fail the test, except the 422 of the invalid form submitted on purpose below.
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().includes("status of 422")) errors.push(m.text());
  });
  await signIn(page);

  // A product, through a server function (the form posts; the list refetches).
  const product = `e2e${Date.now()}`;
  const loaded = wasmLoaded(page);
  await page.goto("/products");
  await loaded;
  const form = page.locator("#product-form");
  await form.getByLabel("Name").fill("Water meter");
  await form.getByLabel("Device type").fill("WaterMeter");
  await form.getByLabel(/Product ID/).fill(product);
  await form.getByRole("button", { name: "Create product" }).click();
  await expect(page.locator("#products")).toContainText(product);
  await expect(form.getByLabel(/Product ID/)).toHaveValue(""); // cleared for the next one
  await page.screenshot({ path: `${SHOTS}/products.png`, fullPage: true });

  // The Devices page: the toggle only works once hydrated.
  // A client-side navigation: the router renders the page in the browser, no new document or bundle.
  await page.getByRole("link", { name: "Devices" }).click();
  await expect(page).toHaveURL(/\/devices$/);
  const toggle = page.locator("#register-toggle");
  const registerForm = page.locator("#register-form");
  await expect(async () => {
    if ((await toggle.getAttribute("aria-expanded")) !== "true") await toggle.click();
    await expect(registerForm).toBeVisible({ timeout: 500 });
  }).toPass();
  await expect(toggle).toHaveText("Close");

  // A bad node id: the server's message appears next to the field.
  await registerForm.getByLabel(/Node ID/).fill("bad id!");
  await registerForm.locator("input[name=node_id]").evaluate((el: HTMLInputElement) => el.removeAttribute("pattern"));
  await registerForm.getByRole("button", { name: "Register" }).click();
  await expect(registerForm.locator(".field-error")).toContainText("may contain only");

  const node = `imei${Date.now()}`;
  await registerForm.getByLabel(/Node ID/).fill(node);
  await registerForm.getByLabel("Name").fill("Pump house meter");
  await registerForm.getByRole("button", { name: "Register" }).click();
  await expect(page.locator("#registered")).toContainText(`${product}_${node}`);
  await expect(page.locator("#device-secret")).toHaveText(/^[A-Za-z0-9]{24}$/);
  await expect(page.locator("#devices")).toContainText(`${product}_${node}`);
  await page.screenshot({ path: `${SHOTS}/devices.png`, fullPage: true });

  // Reloaded from the database: the device is there, the secret is not shown again.
  await page.reload();
  await expect(page.locator("#devices")).toContainText("Pump house meter");
  await expect(page.locator("#device-secret")).toHaveCount(0);

  // Filters live in the URL.
  await page.getByPlaceholder("Search id, node id or name").fill("no-such-device");
  await page.getByRole("button", { name: "Filter" }).click();
  await expect(page).toHaveURL(/q=no-such-device/);
  await expect(page.locator("#devices-empty")).toBeVisible();

  await page.goto("/settings");
  await expect(page.locator("#project-id")).toHaveText(/^[0-9a-f]{32}$/);
  await page.screenshot({ path: `${SHOTS}/settings.png`, fullPage: true });

  // Settings › Audit log: what this test did, under its user; the failed registration with its reason.
  await page.getByRole("navigation", { name: "Main" }).getByRole("link", { name: "Audit log" }).click();
  await expect(page).toHaveURL(/\/settings\/audit$/);
  const audit = page.locator("#audit-list");
  await expect(audit).toContainText("console create_product");
  await expect(audit.getByRole("link", { name: `${product}_${node}` })).toHaveAttribute("href", `/devices/${product}_${node}`);
  await expect(audit).toContainText("may contain only");
  await page.locator("#audit-filters select[name=resource_type]").selectOption("products");
  await page.locator("#audit-filters input[name=resource_id]").fill(product);
  await page.locator("#audit-filters").getByRole("button", { name: "Filter" }).click();
  await expect(page).toHaveURL(/resource_type=products&resource_id=e2e/);
  await expect(audit.locator("tbody tr")).toHaveCount(1);
  await expect(audit).toContainText("admin");
  await page.screenshot({ path: `${SHOTS}/audit.png`, fullPage: true });
  await page.goto("/upgrades");
  await expect(page.getByRole("heading", { name: "Upgrade tasks" })).toBeVisible();
  await page.screenshot({ path: `${SHOTS}/upgrades.png`, fullPage: true });

  await page.getByRole("button", { name: "Sign out" }).click();
  await expect(page).toHaveURL(/\/login$/);
  await page.goto("/devices");
  await expect(page).toHaveURL(/\/login/);
  expect(errors).toEqual([]);
});
