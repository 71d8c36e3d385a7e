"""Open a self-contained HTML report in headless Chromium and collect what tests check about it.

Uses Debian's ``chromium`` and ``chromium-driver`` through Selenium, with the driver path given
explicitly so that Selenium Manager never tries to download anything.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import tempfile

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = "apt-get install -y --no-install-recommends chromium chromium-driver"
LOCAL_SCHEMES = ("data:", "file:", "about:", "blob:")

_READY_JS = "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete);"
_COLLECT_JS = """
const size = e => { const r = e.getBoundingClientRect(); return {width: r.width, height: r.height}; };
const loads = Array.from(document.querySelectorAll(
  'img[src], script[src], iframe[src], source[src], link[rel~="stylesheet"][href], link[rel~="icon"][href]'));
return {
  title: document.title,
  documentWidth: document.documentElement.scrollWidth,
  viewportWidth: window.innerWidth,
  text: document.body ? document.body.innerText : '',
  images: Array.from(document.images).map(i => ({alt: i.alt, naturalWidth: i.naturalWidth,
                                                 naturalHeight: i.naturalHeight, ...size(i)})),
  svgs: Array.from(document.querySelectorAll('svg')).map(size),
  urls: performance.getEntriesByType('resource').map(e => e.name)
        .concat(loads.map(e => e.src || e.href)),
};
"""


@dataclasses.dataclass
class PageCheck:
    """What a loaded page looked like: console errors, image and SVG sizes, outside requests, text."""

    console_errors: list[str]
    images: list[dict]  # alt, naturalWidth, naturalHeight, width, height (rendered, CSS pixels)
    svgs: list[dict]  # width, height of each inline <svg> (rendered, CSS pixels)
    title: str
    requests_outside: list[str]  # loaded or referenced resource URLs not data:, file:, about: or blob:
    text: str  # document.body.innerText
    document_width: int = 0  # document.documentElement.scrollWidth, CSS pixels
    viewport_width: int = 0  # window.innerWidth at the window width asked for


def _start_driver(user_data_dir: str):
    """Start headless Chromium via the system chromedriver, with browser logging enabled."""
    os.environ.setdefault("SE_OFFLINE", "true")  # belt and braces: Selenium Manager is never needed here
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def open_in_chromium(path: pathlib.Path, timeout: float = 30.0, width: int = 1280) -> PageCheck:
    """Load ``path`` in headless Chromium (a window ``width`` CSS pixels wide), wait for the document
    and its images, and report on it.

    Raises:
        selenium.common.TimeoutException: the page or its images did not finish within ``timeout``.
    """
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True) as profile:
        driver = _start_driver(profile)
        try:
            driver.set_window_size(width, 900)
            driver.set_page_load_timeout(timeout)
            driver.get(pathlib.Path(path).resolve().as_uri())
            WebDriverWait(driver, timeout).until(lambda d: d.execute_script(_READY_JS))
            page = driver.execute_script(_COLLECT_JS)
            errors = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        finally:
            driver.quit()
    outside = [u for u in dict.fromkeys(page["urls"]) if u and not u.startswith(LOCAL_SCHEMES)]
    return PageCheck(
        errors, page["images"], page["svgs"], page["title"], outside, page["text"],
        page["documentWidth"], page["viewportWidth"],
    )  # fmt: skip


@functools.cache
def chromium_unavailable_reason() -> str | None:
    """None when headless Chromium can be driven here, else why not (checked once, then cached)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed: pip install 'selenium>=4.20'"
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            return f"{binary} not found (Chromium not installed: {INSTALL_HINT})"
    try:
        with tempfile.TemporaryDirectory(prefix="chromium-probe-", ignore_cleanup_errors=True) as profile:
            _start_driver(profile).quit()
    except Exception as err:  # e.g. missing shared libraries, a driver/browser version mismatch
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"headless Chromium failed to start: {type(err).__name__}: {first_line}"
    return None


_FACTS_JS = """
return Array.from(document.querySelectorAll('details.fact')).map(d => (
  {id: d.id, open: d.open, shown: d.getClientRects().length > 0}));
"""


def pick_fact(path: pathlib.Path, value: str, timeout: float = 30.0) -> dict:
    """Load ``path``, read the per-fact entries, pick ``value`` in the fact picker, read them again,
    press "show every fact", read again: ``{"before": [...], "picked": [...], "all": [...]}`` with
    ``{id, open, shown}`` per entry, and the console errors.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True) as profile:
        driver = _start_driver(profile)
        try:
            driver.set_window_size(1280, 900)
            driver.get(pathlib.Path(path).resolve().as_uri())
            WebDriverWait(driver, timeout).until(lambda d: d.execute_script(_READY_JS))
            before = driver.execute_script(_FACTS_JS)
            Select(driver.find_element(By.ID, "fact-picker")).select_by_value(value)
            picked = driver.execute_script(_FACTS_JS)
            driver.find_element(By.ID, "fact-all").click()
            every = driver.execute_script(_FACTS_JS)
            errors = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        finally:
            driver.quit()
    return {"before": before, "picked": picked, "all": every, "errors": errors}
