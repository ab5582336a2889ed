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


def notebook_of(cells: list[str]) -> dict:
    """An nbformat-4 notebook (JSON) of code cells, to PUT through the contents API."""
    return {
        "cells": [
            {
                "cell_type": "code",
                "metadata": {},
                "source": src,
                "outputs": [],
                "execution_count": None,
            }
            for src in cells
        ],
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def run_all_cells(page, until: str, attempts: int = 6) -> None:
    """Run > Run All Cells, as a person would, until ``until`` shows up. A kernel that is still
    starting may ignore the request, and JupyterLab may first ask which kernel to start: accept
    the proposal and ask again, as a person would."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for _ in range(attempts):
        try:
            _accept_kernel_dialog(page)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click(timeout=10_000)
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click(timeout=10_000)
            page.locator(until).first.wait_for(timeout=20_000)
            return
        except PlaywrightTimeout:
            page.keyboard.press("Escape")  # close a menu left open
    raise AssertionError(f"{until} never appeared after running all cells")


def _accept_kernel_dialog(page) -> None:
    """JupyterLab sometimes asks which kernel to start; a person takes the proposed one."""
    select = page.locator(".jp-Dialog button", has_text="Select")
    if select.count() and select.first.is_visible():
        select.first.click()
        page.locator(".jp-Dialog").first.wait_for(state="detached", timeout=30_000)
