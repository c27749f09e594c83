"""Headless chromium (Debian's chromium + chromium-driver) driven by selenium, for the playground: the browser test's
launcher, and a script that takes the screenshot in docs/playground.png:

    dlp-lora serve --library LIB --port 8000 &
    python tests/playground_browser.py http://127.0.0.1:8000/ docs/playground.png "a prompt" "mix:a=0.6,b=0.4|a prompt"

A prompt "mix:NAME=W,...|TEXT" is sent with that weighted mix (the page's mix editor); the others are routed.
"""

from __future__ import annotations

import shutil
import sys

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def missing() -> list[str]:
    """What the browser needs and this machine lacks (empty: ready)."""
    out = [n for n, p in (("chromium", CHROMIUM), ("chromium-driver", DRIVER)) if p is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        out.append("the selenium package (pip install selenium)")
    return out


def browser(width: int = 1280, height: int = 760):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                "--disable-background-networking"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def send(driver, text: str, timeout: float = 300):
    """Type `text`, send it, wait for the streamed answer to end; returns the assistant's message element."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    done = ".msg.assistant[data-done]"
    n = len(driver.find_elements(By.CSS_SELECTOR, done))
    driver.find_element(By.ID, "prompt").send_keys(text)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, timeout).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) > n)
    return driver.find_elements(By.CSS_SELECTOR, done)[-1]


def set_mix(driver, weights: dict[str, str]) -> None:
    """Choose "a weighted mix" and type these weights into the mix editor (the others are left out)."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "input[name=mode][value=mix]").click()
    for row in driver.find_elements(By.CSS_SELECTOR, "#mix-editor .mix-row"):
        box = row.find_element(By.CSS_SELECTOR, "input[type=checkbox]")
        if box.is_selected() != (row.get_attribute("data-name") in weights):
            box.click()
    for name, w in weights.items():
        field = driver.find_element(By.CSS_SELECTOR, f'#mix-editor [data-name="{name}"] input[type=number]')
        field.clear()
        field.send_keys(w)


def main(url: str, out: str, *prompts: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser(1280, 1160)
    try:
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#adapters li[data-name]"))
        for p in prompts:
            if p.startswith("mix:"):
                spec, _, p = p[4:].partition("|")
                set_mix(driver, dict(kv.split("=", 1) for kv in spec.split(",")))
            else:
                driver.find_element(By.CSS_SELECTOR, "input[name=mode][value=route]").click()
            send(driver, p)
        driver.execute_script("document.getElementById('messages').scrollTop = 0")
        driver.save_screenshot(out)
    finally:
        driver.quit()


if __name__ == "__main__":
    if missing() or len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} URL OUT.png [PROMPT ...]; needs: {', '.join(missing()) or 'nothing more'}")
    main(*sys.argv[1:])
