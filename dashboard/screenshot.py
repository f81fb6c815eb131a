"""Take docs/images/dashboard.png from a real `feed demo` session.

    .venv/bin/python dashboard/screenshot.py [output.png]

It runs `feed demo` (embedded Postgres and Redis, the demo writer, the server), opens a bookmarked
view in Debian's chromium through Playwright, lets the writer work long enough for the sparklines
to fill, selects the newest order update and saves the page. The demo is stopped with SIGTERM,
which stops its database servers too.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

from playwright.async_api import async_playwright, expect

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
VIEW = (
    "/?room=main:public.orders&room=main:public.orders&filter=status=eq.paid&room=cache:session:*"
)
URL_LINE = re.compile(rb"feed demo: dashboard: (http://\S+)/")
ACTIVITY_SECONDS = 25  # the sparklines show a minute; this is enough to see their shape


async def start_demo() -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        str(ROOT / ".venv" / "bin" / "feed"), "demo", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(180):
        while True:
            line = await process.stdout.readline()
            if not line:
                raise RuntimeError(f"feed demo exited with {await process.wait()}")
            sys.stdout.write(line.decode(errors="replace"))
            found = URL_LINE.search(line)
            if found:
                asyncio.get_running_loop().create_task(drain(process.stdout))
                return process, found.group(1).decode()


async def drain(stream: asyncio.StreamReader) -> None:
    """Keep reading the demo's log so that a full pipe never blocks it."""
    while await stream.readline():
        pass


async def main(output: Path) -> None:
    process, url = await start_demo()
    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=ARGS
            )
            page = await browser.new_page(
                viewport={"width": 1360, "height": 1120}, device_scale_factor=1
            )
            page.set_default_timeout(30_000)
            await page.goto(url + VIEW)
            await expect(page.locator('#subscriptions li[data-status="live"]')).to_have_count(3)
            await asyncio.sleep(ACTIVITY_SECONDS)  # let the writer produce a realistic history
            update = page.locator("#change-rows tr").filter(
                has=page.locator('.op[data-op="update"]')
            )
            await update.first.click()
            await expect(page.locator("#changed-fields")).to_contain_text("Changed")
            await page.mouse.move(0, 0)
            output.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(output), full_page=False)
            await browser.close()
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 60)
    print(f"saved {output}")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "images" / "dashboard.png"
    asyncio.run(main(target))
