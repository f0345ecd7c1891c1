import { expect, type Page } from "@playwright/test";
import * as fs from "node:fs";

// What every end2end test needs: the admin password scripts/e2e.sh set, the screenshot directory,
// signing in, and waiting for hydration.

export const PASSWORD = process.env.E2E_PASSWORD ?? "";
export const SHOTS = "screenshots";
fs.mkdirSync(SHOTS, { recursive: true });

export async function signIn(page: Page) {
  await page.goto("/login");
  await page.getByLabel("User name").fill("admin");
  await page.getByLabel("Password").fill(PASSWORD);
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page).toHaveURL(/\/devices$/);
}

/** Navigates and waits until the page is hydrated (the frontend marks the body). */
export async function open(page: Page, path: string) {
  await page.goto(path);
  await page.locator("body[data-hydrated]").waitFor({ state: "attached" });
}

/** Creates a product from the Products page. */
export async function createProduct(page: Page, id: string, name: string) {
  await open(page, "/products");
  const form = page.locator("#product-form");
  await form.getByLabel("Name").fill(name);
  await form.getByLabel("Device type").fill("Meter");
  await form.getByLabel(/Product ID/).fill(id);
  await form.getByRole("button", { name: "Create product" }).click();
  await expect(page.locator("#products")).toContainText(id);
}
