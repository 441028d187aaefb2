// Pieces the browser scripts share: Debian's headless Chromium, and queueing the graph as the Run button does.
import { chromium } from "playwright-core";

export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.FP16LR_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
  });
}

// Queue the graph on `page` as the Run button does; resolves with the prompt id once the server starts it.
export function queue(page) {
  return page.evaluate(async () => {
    const { app } = window.comfyAPI.app;
    const { api } = window.comfyAPI.api;
    const started = new Promise((resolve) => {
      const onStart = ({ detail }) => {
        api.removeEventListener("execution_start", onStart);
        resolve(detail.prompt_id);
      };
      api.addEventListener("execution_start", onStart);
    });
    await app.queuePrompt(0, 1);
    return started;
  });
}
