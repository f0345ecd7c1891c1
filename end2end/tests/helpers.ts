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
