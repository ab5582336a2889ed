"""A real headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

Never ``playwright install``: the browser is the distribution's, launched with the flags that
make it quiet and self-contained on a server (no sandbox as root, no GPU, no background calls).
"""

from __future__ import annotations

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def launch_chromium(playwright):
    """A Playwright Browser of Debian's Chromium."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))


def log_in(page, hub_url: str, user: str, password: str) -> None:
    """Fill in and submit the JupyterHub login form; returns once the answer has loaded."""
    page.goto(f"{hub_url}login")
    page.fill("#username_input", user)
    page.fill("#password_input", password)
    with page.expect_navigation():
        page.click("#login_submit")
