"""The dashboard: GET / and its assets, the stats feed behind the API key, and the page in a real
browser (headless Chromium driven by ChromeDriver, Debian's chromium and chromium-driver, which
.ci/run installs) while a load runs: the numbers move, the block map fills, the playground streams
an answer, and a screenshot is saved (target/artifacts/dashboard.png, or $CANDELA_ARTIFACTS)."""

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, Server

KEY = "dash-key"
MODEL = "stories-dash"
ARTIFACTS = Path(os.environ.get("CANDELA_ARTIFACTS", ROOT / "target" / "artifacts"))
CHROMIUM = next((p for p in map(shutil.which, ["chromium", "chromium-browser", "google-chrome"]) if p),
                None)
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def dash():
    s = Server(
        "--model", "models/stories260K",
        "--served-model-name", MODEL,
        "--chat-template", "tests/fixtures/chatml.jinja",
        "--api-key", KEY,
        "--enable-prefix-caching",
        "--num-kv-blocks", "320",
        "--block-size", "16",
        "--max-num-seqs", "16",
    )
    yield s
    s.stop()


def fetch(server, path, key=KEY, body=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(server.base + path, headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.headers, r.read()


def stats(server):
    return json.loads(fetch(server, "/v1/engine/stats")[2])


def test_page_and_assets_are_served_from_the_binary(dash):
    status, headers, body = fetch(dash, "/", key=None)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert b"/dashboard/app.js" in body
    for path, kind in [("/dashboard/app.js", "text/javascript"), ("/dashboard/style.css", "text/css")]:
        status, headers, _ = fetch(dash, path, key=None)
        assert status == 200 and headers["Content-Type"].startswith(kind)


def test_stats_need_the_key_and_describe_the_engine(dash):
    with pytest.raises(urllib.error.HTTPError) as e:
        fetch(dash, "/v1/engine/stats", key=None)
    assert e.value.code == 401
    assert json.loads(e.value.read())["error"]["message"]

    # A request with a shared prefix, twice: the second hits the prefix cache.
    prompt = "Once upon a time there was a little girl who lived in a small house. " * 3
    for _ in range(2):
        fetch(dash, "/v1/completions", body={"prompt": prompt, "max_tokens": 8, "model": MODEL})
    time.sleep(2.2)  # two samples of the sampler
    s = stats(dash)
    assert s["model"] == MODEL and s["task"] == "generate" and s["chat"] is True and s["alive"]
    cfg = s["config"]
    assert cfg["num_blocks"] == 320 and cfg["block_size"] == 16 and cfg["prefix_caching"]
    now = s["now"]
    assert now["generation_tokens_total"] >= 16 and now["requests_finished_total"] >= 2
    assert now["prefix_cache_hits_total"] > 0
    blocks = s["blocks"]
    assert len(blocks["map"]) == blocks["num_blocks"] == 320
    assert set(blocks["map"]) <= set("0123")
    assert blocks["free"] + blocks["cached"] + blocks["in_use"] + blocks["shared"] == 320
    assert blocks["cached"] > 0, "the finished prompts' full blocks stay cached"
    h = s["history"]
    assert len(h["t"]) >= 1 and all(len(h[k]) == len(h["t"]) for k in h if k != "interval_s")
    assert s["latency"]["ttft"]["count"] >= 2 and s["latency"]["ttft"]["p50_s"] > 0


class Load:
    """Streaming completions from several threads until stopped."""

    def __init__(self, server, threads=8):
        self.server, self.stop_flag, self.done = server, threading.Event(), 0
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def run(self, i):
        n = 0
        while not self.stop_flag.is_set():
            prompt = f"Once upon a time, a little dog named Max {i} {n}"
            body = {"prompt": prompt, "max_tokens": 200, "stream": True, "ignore_eos": True,
                    "temperature": 0.8, "model": MODEL}
            try:
                _, _, raw = fetch(self.server, "/v1/completions", body=body)
                assert raw.rstrip().endswith(b"data: [DONE]")
                self.done += 1
            except OSError:
                time.sleep(0.1)
            n += 1

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=60)


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium "
                    "chromium-driver; .ci/run does it where it can): the dashboard's browser test "
                    "did not run")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1250", "--hide-scrollbars"]:
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager would try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(what, check, timeout=20):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def number(driver, element_id):
    text = driver.find_element("id", element_id).text.replace(",", "").split()[0]
    return float(text) if text not in ("–", "") else None


def test_dashboard_in_a_browser(dash, browser):
    by_id = lambda i: browser.find_element("id", i)  # noqa: E731
    browser.get(dash.base + "/")
    # Without the key the page says so, and takes it.
    wait_for("the API key banner", lambda: by_id("auth-banner").is_displayed())
    assert "API key" in by_id("status").text
    by_id("api-key").send_keys(KEY)
    by_id("save-key").click()
    wait_for("the model's name", lambda: by_id("model").text == MODEL)
    assert not by_id("auth-banner").is_displayed()

    load = Load(dash)
    try:
        wait_for("running requests", lambda: (number(browser, "running") or 0) > 0)
        wait_for("output tokens/s", lambda: (number(browser, "gen-tps") or 0) > 0)
        before = number(browser, "gen-total")
        wait_for("the generated-token count to move",
                 lambda: (number(browser, "gen-total") or 0) > (before or 0) + 100)
        blockmap = by_id("blockmap")
        wait_for("blocks in use on the map", lambda: int(blockmap.get_attribute("data-in-use") or 0) > 0)
        has_latency = lambda i: by_id(i).text.endswith((" ms", " s"))  # noqa: E731
        wait_for("the TTFT percentiles", lambda: has_latency("ttft"), timeout=30)
        assert has_latency("itl")

        # The playground streams a chat answer through the same API, with the key
        # (greedy: this tiny model's answer to this prompt is not empty).
        by_id("temperature").clear()
        by_id("temperature").send_keys("0")
        by_id("prompt").send_keys("Tell me a story.")
        by_id("send").click()
        wait_for("the playground's answer", lambda: by_id("play-status").text.startswith("done"),
                 timeout=60)
        answers = browser.find_elements("css selector", "#transcript .msg.assistant")
        assert answers and answers[-1].text.strip(), "an answer was streamed"
        assert not browser.find_elements("css selector", "#transcript .msg.error")
        time.sleep(1.5)  # let the charts gather a few more seconds of load
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        assert browser.save_screenshot(str(shot)), "screenshot saved"
        print(f"dashboard screenshot: {shot}")
    finally:
        load.stop()
    assert load.done > 0
    # No script errors, no content-security-policy violations, no missing
    # resource (the 401 that asked for the key aside).
    errors = [e for e in browser.get_log("browser")
              if e["level"] == "SEVERE" and "status of 401" not in e["message"]]
    assert not errors, errors
    # And the engine drains: nothing running, every block free or cached.
    wait_for("an idle engine", lambda: stats(dash)["now"]["running"] == 0)
    b = stats(dash)["blocks"]
    assert b["in_use"] == 0 and b["shared"] == 0
