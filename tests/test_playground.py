"""The playground page (GET /) in a real browser: Debian's chromium driven by selenium against a server on a tiny
library. It must show the adapters with their routing states, stream an answer with the routed adapters drawn as
bars, and show a pinned mix. The screenshot is kept as an artefact (build/test-artifacts/playground.png, or
$DLP_LORA_ARTIFACTS). Without chromium the browser test skips, saying why; CI sets DLP_LORA_REQUIRE_BROWSER=1
(.ci/run installs chromium), and then a missing browser fails it."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from dlplora.engine import DLPLoRA
from dlplora.serve import ServeConfig, ServerThread, create_app
from dlplora.testing import random_peft_library

import playground_browser
from wordplugin import train_word_plugin

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "sk-playground-123"
SPECS = {"alpha": (4, 8, ["q_proj", "v_proj"]), "beta": (8, 8, ["q_proj", "v_proj"]), "gamma": (2, 4, ["o_proj"])}
WORDS = {"alpha": ("add", "sum", "plus", "number", "total", "seven"),
         "beta": ("bonjour", "maison", "voiture", "chat", "pomme", "rouge")}  # gamma: unknown to the router


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_model):
    lib = random_peft_library(tmp_path_factory.mktemp("play") / "lib", tiny_model, SPECS, std=0.5, seed=10)
    train_word_plugin(lib, WORDS, ("weather", "rain", "football", "goal", "guitar", "song"))
    return DLPLoRA.from_library(lib)


def test_the_page_is_served_without_the_key_and_no_playground_leaves_it_out(engine):
    with ServerThread(create_app(engine, ServeConfig(api_key=KEY))) as srv:
        page = httpx.get(srv.url + "/")
        assert page.status_code == 200 and "playground/playground.js" in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for name in ("playground.js", "playground.css"):
            assert httpx.get(f"{srv.url}/playground/{name}").status_code == 200
        for other in ("playground.py", "..%2Fconfig.py", "index.html"):  # the page's two files only
            assert httpx.get(f"{srv.url}/playground/{other}").status_code == 404, other
        assert httpx.get(srv.url + "/v1/models").status_code == 401  # the API itself still needs the key
        assert httpx.post(srv.url + "/", json={}).status_code == 401  # only GET of the page is open
    with ServerThread(create_app(engine, ServeConfig(playground=False))) as srv:
        assert httpx.get(srv.url + "/").status_code == 404
        assert httpx.get(srv.url + "/playground/playground.js").status_code == 404


def _browser():
    need = playground_browser.missing()
    if need:
        reason = f"the playground's browser test needs {', '.join(need)} (apt-get install chromium chromium-driver)"
        if os.environ.get("DLP_LORA_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; DLP_LORA_REQUIRE_BROWSER=1 (CI) requires it")
        pytest.skip(reason)
    return playground_browser.browser()


def _artefacts() -> Path:
    d = Path(os.environ.get("DLP_LORA_ARTIFACTS") or Path(__file__).resolve().parents[1] / "build" / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_the_playground_in_chromium_streams_routes_and_pins_a_mix(engine):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = _browser()
    app = create_app(engine, ServeConfig(api_key=KEY, max_tokens_limit=64, request_timeout=60))
    try:
        with ServerThread(app) as srv:
            wait = WebDriverWait(browser, 60)
            css = lambda sel: browser.find_elements(By.CSS_SELECTOR, sel)  # noqa: E731
            browser.get(srv.url + "/")
            wait.until(lambda _: browser.find_element(By.ID, "key-form").is_displayed())  # /v1/models said 401
            browser.find_element(By.ID, "api-key").send_keys(KEY + "\n")
            wait.until(lambda _: len(css("#adapters li[data-name]")) == 3)
            states = {li.get_attribute("data-name"): li.find_element(By.CSS_SELECTOR, ".state").text
                      for li in css("#adapters li[data-name]")}
            assert states == {"alpha": "routable", "beta": "routable", "gamma": "pinned-only"}

            def turn(text):
                msg = playground_browser.send(browser, text, timeout=60)
                bars = {r.get_attribute("data-name"): float(r.find_element(By.CSS_SELECTOR, ".weight").text)
                        for r in msg.find_elements(By.CSS_SELECTOR, ".bar-row")}
                return msg, bars

            prompt = "add seven plus number total sum"
            msg, bars = turn(prompt)
            assert msg.get_attribute("data-done") == "1", msg.text
            assert list(bars) == ["alpha"] and "routed by the plugin" in msg.text and "tok/s" in msg.text
            want = httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                              json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 64}).json()
            answer = msg.find_element(By.CSS_SELECTOR, ".text").text
            assert answer and answer == want["choices"][0]["message"]["content"].strip()  # the stream, in full

            playground_browser.set_mix(browser, {"beta": "0.3", "gamma": "0.7"})
            msg, bars = turn("bonjour maison")
            assert bars == {"beta": 0.3, "gamma": 0.7} and "your mix" in msg.text, msg.text

            browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=pin]").click()
            Select(browser.find_element(By.ID, "pin-select")).select_by_value("gamma")
            msg, bars = turn("anything")
            assert bars == {"gamma": 1.0} and "pinned" in msg.text

            browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=route]").click()
            msg, bars = turn("weather rain football goal guitar song")
            assert bars == {} and "base model:" in msg.find_element(By.CSS_SELECTOR, ".base-reason").text
            browser.execute_script("document.getElementById('messages').scrollTop = 0")
            assert browser.save_screenshot(str(_artefacts() / "playground.png"))
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"
                      and "status of 401" not in e["message"]]  # the first /v1/models, before the key
            assert not errors, errors
    finally:
        browser.quit()


def test_the_no_playground_flag_reaches_the_config():
    from dlplora.cli import build_parser
    from dlplora.cli.serve import config_from_args

    parse = build_parser().parse_args
    assert config_from_args(parse(["serve", "--library", "LIB"])).playground is True
    assert config_from_args(parse(["serve", "--library", "LIB", "--no-playground"])).playground is False
