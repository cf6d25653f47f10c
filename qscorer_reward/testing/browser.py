"""A real headless Chromium for tests and benchmarks of the HTML report, driven by Selenium.

It uses the system's ``chromium`` and ``chromedriver`` (Debian: ``apt-get install chromium
chromium-driver``), named explicitly so that Selenium never tries to download a browser or a
driver, with a fresh profile and the browser's own background traffic switched off. The browser's
network log is recorded, so a test can list every request a page made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qscorer_reward.extras import require_extra

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def chromium_paths() -> tuple[str, str] | None:
    """``(browser, driver)`` executables, or ``None`` when either is missing. ``CHROMIUM`` and
    ``CHROMEDRIVER`` override the search of PATH."""
    browser = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def headless_chromium(width: int = 1200, height: int = 900) -> Iterator:
    """A Selenium ``webdriver.Chrome`` on a headless Chromium with a window of ``width`` x
    ``height`` CSS pixels and a throwaway profile; quit on exit."""
    require_extra("dev", __name__)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        raise RuntimeError("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
    browser, driver_path = paths
    with tempfile.TemporaryDirectory(prefix="qscorer-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in (*CHROMIUM_FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def open_page(driver, page: Path) -> None:
    """Load the local file ``page``, starting from a blank tab with the network log emptied (the
    browser's own start page is not counted against the page)."""
    driver.get("about:blank")
    driver.get_log("performance")
    driver.get(page.resolve().as_uri())


def requested_urls(driver) -> list[str]:
    """Every URL the browser requested (documents, images, scripts, fetches, web sockets) since
    the network log was last read."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.append(message["params"]["url"])
    return urls
