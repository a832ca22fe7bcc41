"""The dashboard and the API docs in a real headless Chromium against a real ``lipcert serve``.

Debian's ``chromium`` and ``chromium-driver`` (installed by ./scripts/test), driven by selenium.
Chromium runs with every host except 127.0.0.1 unresolvable (``--host-resolver-rules``), so the
pages are checked as on a machine without internet: /docs and /redoc must list every operation
from their own assets, and / must take a user from a model upload to a certified-accuracy curve.

Set ``LIPCERT_DASHBOARD_SCREENSHOT=docs/dashboard.png`` to write the README's screenshot.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.serve_process import ServeProcess, serving
from tests.service.jobs_support import big_random_net

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
API_KEY = "dashboard-test-key"
WAIT_S = 60.0
REDOCLY_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

# --- a real server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """``lipcert serve`` with an API key (the pages are public, /v1 is not)."""
    base = tmp_path_factory.mktemp("dash")
    with serving(base / "data", base / "server.log", LIPCERT_API_KEY=API_KEY) as srv:
        yield srv


def client(srv: ServeProcess) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"X-API-Key": API_KEY}, timeout=60)


# --- a real browser -------------------------------------------------------------------------


def _chromium_flags(profile: Path) -> list[str]:
    """Headless, sandbox-free (root in CI), and quiet on a closed network: no background
    services, and every host but 127.0.0.1 unresolvable (the "no internet" of the tests)."""
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
    ]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} / {CHROMEDRIVER} missing (./scripts/test installs them)")
        pytest.skip("Debian chromium and chromium-driver are not installed (./scripts/test does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in _chromium_flags(tmp_path_factory.mktemp("chromium-profile")):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_S)
    downloads = tmp_path_factory.mktemp("downloads")
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, cond: Callable[[Any], Any], what: str, timeout: float = WAIT_S) -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond)
    except Exception as exc:
        notice = driver.execute_script(
            "var n = document.getElementById('notice'); return n ? n.textContent : '';"
        )
        logs = [e["message"] for e in driver.get_log("browser")][-10:]
        raise AssertionError(
            f"timed out waiting for {what}; notice={notice!r}; log={logs}"
        ) from exc


def downloaded(driver: Any, name: str) -> Path:
    """The file ``name`` once the browser has finished writing it to its download folder."""
    path = Path(driver.downloads) / name
    wait_for(driver, lambda d: path.is_file() and path.stat().st_size > 0, f"download {name}")
    return path


def text_of(driver: Any, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def foreign_requests(driver: Any, origin: str) -> list[str]:
    """Every resource the page loaded from anywhere but ``origin``."""
    names = driver.execute_script(
        "return performance.getEntriesByType('resource').map(function (e) { return e.name; })"
    )
    return [n for n in names if not n.startswith(origin) and not n.startswith(("data:", "blob:"))]


def operations(openapi: dict[str, Any]) -> set[tuple[str, str]]:
    methods = {"get", "post", "put", "patch", "delete"}
    return {
        (method.upper(), path)
        for path, ops in openapi["paths"].items()
        for method in ops
        if method in methods
    }


# --- the docs -------------------------------------------------------------------------------


def test_docs_list_every_operation_without_internet(server: ServeProcess, browser: Any) -> None:
    expected = operations(httpx.get(server.url + "/openapi.json").json())
    assert len(expected) >= 15
    browser.get(server.url + "/docs")
    wait_for(
        browser,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= len(expected),
        "Swagger UI operations",
    )
    shown = set()
    for block in browser.find_elements(By.CSS_SELECTOR, ".opblock"):
        method = block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text
        path = block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute(
            "data-path"
        )
        shown.add((method.upper(), path))
    assert shown == expected
    assert foreign_requests(browser, server.url) == []

    browser.get(server.url + "/redoc")
    # ReDoc renders one section per operation, id "operation/<tag>/<operationId>"
    wait_for(
        browser,
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, "[data-section-id^='operation/']"))
            >= len(expected)
        ),
        "ReDoc operations",
    )
    sections = browser.find_elements(By.CSS_SELECTOR, "[data-section-id^='operation/']")
    assert len(sections) == len(expected)
    # ReDoc's footer always asks for Redocly's logo; the page's Content-Security-Policy refuses
    # it (it is never fetched) and ReDoc drops the image when it fails to load
    assert set(foreign_requests(browser, server.url)) <= {REDOCLY_LOGO}
    refused = [e["message"] for e in browser.get_log("browser") if REDOCLY_LOGO in e["message"]]
    assert all("Content Security Policy" in m for m in refused), refused
    assert not browser.find_elements(By.CSS_SELECTOR, f"img[src='{REDOCLY_LOGO}']")


# --- the dashboard --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """scripts/example_model.py's network, and a labelled test set from its training inputs
    with one label in ten wrong (so the curve starts at 90 %)."""
    out = tmp_path_factory.mktemp("example")
    subprocess.run([sys.executable, "scripts/example_model.py", str(out)], cwd=ROOT, check=True)
    with np.load(out / "train.npz") as z:
        x, y = z["x"][:200], z["y"][:200].copy()
    y[::10] = (y[::10] + 1) % 3
    np.savez(out / "testset.npz", inputs=x, labels=y)
    return {"model": out / "mlp.onnx", "testset": out / "testset.npz"}


def _certified_accuracy(server: ServeProcess, model_id: str, testset: Path, eps: float) -> float:
    with client(server) as c:
        r = c.post(
            f"/v1/models/{model_id}/certify?epsilon={eps}",
            content=testset.read_bytes(),
            headers={"content-type": "application/x-npz"},
        )
    assert r.status_code == 200, r.text
    return float(r.json()["certified_accuracy"])


def _no_horizontal_overflow(driver: Any) -> bool:
    return bool(
        driver.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1;"
        )
    )


def open_with_key(driver: Any, url: str) -> None:
    """Open the dashboard in a fresh session and give it the API key it asks for."""
    driver.get(url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(url + "/")
    dialog = driver.find_element(By.ID, "key-dialog")
    wait_for(driver, lambda d: dialog.get_attribute("open") is not None, "the key dialog")
    driver.find_element(By.ID, "key-input").send_keys(API_KEY + Keys.ENTER)
    wait_for(driver, lambda d: text_of(d, "st-version") != "…", "the status panel")


def test_dashboard_upload_bound_certify(
    server: ServeProcess, browser: Any, example: dict[str, Path]
) -> None:
    browser.set_window_size(1280, 1000)
    open_with_key(browser, server.url)
    assert text_of(browser, "st-version") == "0.1.0"
    assert text_of(browser, "st-device").startswith("cpu")
    assert text_of(browser, "st-key") == "required"
    assert text_of(browser, "st-ready") == "yes"

    # upload through the file input
    browser.find_element(By.ID, "model-file").send_keys(str(example["model"]))
    row = wait_for(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#models-table tbody tr"),
        "the uploaded model's row",
    )[0]
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    model_id = row.get_attribute("data-model")
    with client(server) as c:
        rec = c.get(f"/v1/models/{model_id}").json()
    assert cells[:5] == ["mlp.onnx", "onnx", rec["kind"], "(4)", "(3)"]
    assert cells[5] == f"{rec['parameters']:,}"
    assert cells[6] == "–"  # no bound yet

    # run a LipSDP-Neuron bound and watch it live
    Select(browser.find_element(By.ID, "bound-method")).select_by_value("lipsdp-neuron")
    browser.find_element(By.ID, "bound-start").click()
    wait_for(browser, lambda d: text_of(d, "job-status") == "succeeded", "the bound job", 240)
    log = text_of(browser, "job-log")
    # live events: status changes and solver progress (a step shorter than the stream's
    # 0.25 s poll may be folded into the next), then the end
    assert "status: " in log and "phase=" in log and log.endswith("end: succeeded")
    with client(server) as c:
        best = c.get(f"/v1/models/{model_id}/bounds").json()["best"]
    assert best["method"] == "lipsdp-neuron" and best["verified"] is True
    shown_l = f"{best['lipschitz_bound']:.6g}"
    assert shown_l in text_of(browser, "job-result")
    wait_for(
        browser,
        lambda d: shown_l in d.find_element(By.CSS_SELECTOR, "#models-table tbody tr").text,
        "the best bound in the models table",
    )

    # certify the labelled test set and read the curve
    eps = 0.05
    field = browser.find_element(By.ID, "certify-epsilon")
    field.clear()
    field.send_keys(str(eps))
    browser.find_element(By.ID, "testset-file").send_keys(str(example["testset"]))
    browser.find_element(By.ID, "certify-run").click()
    wait_for(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#curve svg path.curve"),
        "the certified-accuracy curve",
    )
    expected = _certified_accuracy(server, model_id, example["testset"], eps)
    assert text_of(browser, "res-n") == "200"
    assert text_of(browser, "res-accuracy") == "90.0 %"
    assert text_of(browser, "res-certified").startswith(f"{100 * expected:.1f} %")
    curve = browser.find_element(By.CSS_SELECTOR, "#curve svg")
    assert curve.get_attribute("data-points") == "180"  # one step per correct input
    steps = curve.find_element(By.CSS_SELECTOR, "path.curve").get_attribute("d").count("V")
    assert steps == 180
    bars = browser.find_elements(By.CSS_SELECTOR, "#histogram svg rect.bar")
    assert bars
    weakest = browser.find_elements(By.CSS_SELECTOR, "#weakest tbody tr")
    assert len(weakest) == 10
    radii = [float(r.find_elements(By.TAG_NAME, "td")[4].text) for r in weakest]
    assert radii == sorted(radii)

    # downloads: the results as TSV and .npz, the best bound's full certificate
    browser.find_element(By.ID, "download-tsv").click()
    tsv = downloaded(browser, f"lipcert-certify-{model_id}.tsv")
    lines = tsv.read_text().splitlines()
    assert lines[0].startswith(f"# model {model_id}") and len(lines) == 2 + 200
    columns = lines[1].split("\t")
    rows = [dict(zip(columns, line.split("\t"), strict=True)) for line in lines[2:]]
    assert sum(r["certified"] == "true" for r in rows) == round(200 * expected)
    browser.find_element(By.ID, "download-npz").click()
    npz = downloaded(browser, f"lipcert-certify-{model_id}.npz")
    with np.load(npz, allow_pickle=False) as z:
        assert z["radius"].shape == (200,)
        assert [f"{r:.17g}" for r in z["radius"]] == [
            f"{float(r['radius']):.17g}" for r in rows
        ]  # the same numbers in both downloads
        assert float(z["certified_accuracy"]) == expected
    row = browser.find_element(By.CSS_SELECTOR, f"tr[data-model='{model_id}']")
    row.find_element(By.XPATH, ".//button[text()='Certificate']").click()
    cert = json.loads(
        downloaded(browser, f"lipcert-{model_id}-lipsdp-neuron-certificate.json").read_text()
    )
    assert cert["bound"]["lipschitz_bound"] == best["lipschitz_bound"]
    assert len(cert["bound"]["certificate"]["multipliers"]) >= 1  # the full certificate

    screenshot = os.environ.get("LIPCERT_DASHBOARD_SCREENSHOT")
    if screenshot:
        _save_screenshot(browser, Path(screenshot))

    # text contrast (WCAG AA 4.5:1) of the page's kinds of text
    worst = browser.execute_script(CONTRAST_JS)
    assert worst["ratio"] >= 4.5, worst

    # phone width: one column, nothing wider than the screen, controls still reachable
    browser.set_window_size(390, 844)
    wait_for(browser, _no_horizontal_overflow, "no horizontal scrolling at phone width", 10)
    for element_id in ("model-file", "bound-start", "certify-run", "curve"):
        el = browser.find_element(By.ID, element_id)
        assert el.is_displayed()
        rect = el.rect
        assert rect["x"] >= 0 and rect["x"] + rect["width"] <= 390 + 1, (element_id, rect)
    browser.set_window_size(1280, 1000)
    assert _no_horizontal_overflow(browser)

    # keyboard, on a fresh page: the first Tab reaches the skip link, focus is always visible
    browser.get(server.url + "/")
    wait_for(
        browser,
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"),
        "the dashboard to load again",
    )
    ActionChains(browser).send_keys(Keys.TAB).perform()
    focused = browser.switch_to.active_element
    assert focused.text == "Skip to content"
    for _ in range(6):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        focused = browser.switch_to.active_element
        style = browser.execute_script(
            "var s = getComputedStyle(arguments[0]); return [s.outlineStyle, s.outlineWidth];",
            focused,
        )
        assert style[0] != "none" and style[1] != "0px", (focused.tag_name, style)

    # drop a larger model on the page, start a long solve, watch it run and cancel it
    data = base64.b64encode(big_random_net()).decode()
    browser.execute_script(DROP_JS, browser.find_element(By.ID, "drop"), data, "big.mat")
    big = wait_for(
        browser,
        lambda d: d.find_elements(By.XPATH, "//tr[@data-model][td[1][text()='big.mat']]"),
        "the dropped model's row",
    )[0]
    big_id = big.get_attribute("data-model")
    chosen = Select(browser.find_element(By.ID, "model-select")).first_selected_option
    assert chosen.get_attribute("value") == big_id  # a new upload becomes the selected model
    Select(browser.find_element(By.ID, "bound-method")).select_by_value("lipsdp-neuron")
    Select(browser.find_element(By.ID, "bound-solver")).select_by_value("scs")
    browser.find_element(By.ID, "bound-start").click()
    wait_for(browser, lambda d: text_of(d, "job-status") == "running", "the long job to run", 120)
    job_id = text_of(browser, "job-id")
    wait_for(browser, lambda d: text_of(d, "st-running") == "1", "the status panel's running job")
    assert job_id[:8] in text_of(browser, "st-active")
    # a reload loses the live view; the status panel's Watch button follows the job again
    browser.refresh()
    watch = wait_for(
        browser,
        lambda d: d.find_elements(
            By.CSS_SELECTOR, f"#st-active button[aria-label$='{job_id[:8]}']"
        ),
        "the running job in the status panel",
    )[0]
    assert not text_of(browser, "job-id")
    watch.click()
    wait_for(browser, lambda d: text_of(d, "job-status") == "running", "the followed job")
    assert text_of(browser, "job-id") == job_id
    browser.find_element(By.ID, "bound-cancel").click()
    wait_for(browser, lambda d: text_of(d, "job-status") == "cancelled", "the cancellation")
    with client(server) as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled"
    assert job["model_id"] == big_id and job["solver"] == "scs"

    # delete the first model (confirm dialog)
    row = browser.find_element(By.CSS_SELECTOR, f"tr[data-model='{model_id}']")
    row.find_element(By.CSS_SELECTOR, "button.danger").click()
    browser.switch_to.alert.accept()
    wait_for(
        browser,
        lambda d: not d.find_elements(By.CSS_SELECTOR, f"tr[data-model='{model_id}']"),
        "the model to be deleted",
    )
    with client(server) as c:
        assert c.get(f"/v1/models/{model_id}").status_code == 404
        assert c.get(f"/v1/models/{big_id}").status_code == 200


DROP_JS = """
var zone = arguments[0], bin = atob(arguments[1]), name = arguments[2];
var bytes = new Uint8Array(bin.length);
for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
var dt = new DataTransfer();
dt.items.add(new File([bytes], name));
["dragenter", "dragover", "drop"].forEach(function (t) {
  zone.dispatchEvent(new DragEvent(t, {dataTransfer: dt, bubbles: true, cancelable: true}));
});
"""


CONTRAST_JS = """
function rgb(s) {
  var m = s.match(/[\\d.]+/g).map(Number);
  return m.length > 3 && m[3] === 0 ? null : m;
}
function lum(c) {
  var v = c.slice(0, 3).map(function (x) {
    x /= 255;
    return x <= 0.03928 ? x / 12.92 : Math.pow((x + 0.055) / 1.055, 2.4);
  });
  return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2];
}
function bg(el) {
  for (; el; el = el.parentElement) {
    var c = rgb(getComputedStyle(el).backgroundColor);
    if (c) return c;
  }
  return [255, 255, 255];
}
var worst = {ratio: 99, what: ""};
var kinds = "h1, h2, h3, p, dt, dd, th, td, label, button, a, figcaption, small, li";
document.querySelectorAll(kinds).forEach(function (el) {
  if (!el.offsetParent || !el.textContent.trim()) return;
  var a = lum(rgb(getComputedStyle(el).color)), b = lum(bg(el));
  var r = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  if (r < worst.ratio) worst = {ratio: r, what: el.tagName + " " + el.textContent.slice(0, 30)};
});
return worst;
"""


def _save_screenshot(driver: Any, path: Path) -> None:
    """The dashboard at 1280 px, as a small palette PNG (for the README)."""
    from PIL import Image

    driver.execute_script("window.scrollTo(0, document.getElementById('work').offsetTop - 8)")
    raw = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    small = raw.resize((raw.width * 3 // 4, raw.height * 3 // 4), Image.Resampling.LANCZOS)
    small.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


# --- the API key ----------------------------------------------------------------------------


def test_api_key_flow(server: ServeProcess, browser: Any) -> None:
    """The dashboard asks for the key, refuses a wrong one, keeps the right one for the tab
    (never in a URL), and /docs sends it on "Try it out"."""
    browser.set_window_size(1280, 1000)
    browser.get(server.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(server.url + "/")
    dialog = browser.find_element(By.ID, "key-dialog")
    wait_for(browser, lambda d: dialog.get_attribute("open") is not None, "the key dialog")
    assert browser.switch_to.active_element.get_attribute("id") == "key-input"
    # cancelled, it stays closed through the next status polls until the button asks again
    browser.find_element(By.ID, "key-cancel").click()
    time.sleep(3.5)
    assert dialog.get_attribute("open") is None
    assert "API key is needed" in text_of(browser, "notice")
    browser.find_element(By.ID, "key-button").click()
    assert dialog.get_attribute("open") is not None

    browser.find_element(By.ID, "key-input").send_keys("wrong" + Keys.ENTER)
    wait_for(browser, lambda d: "refused" in dialog.text, "the wrong key to be refused")
    browser.find_element(By.ID, "key-input").send_keys(API_KEY + Keys.ENTER)
    wait_for(browser, lambda d: text_of(d, "st-key") == "required", "the status panel")
    assert dialog.get_attribute("open") is None
    assert browser.execute_script("return sessionStorage.getItem('lipcert-api-key')") == API_KEY
    assert API_KEY not in browser.current_url

    # Swagger UI's "Try it out" sends the key the dashboard keeps for the session
    browser.get(server.url + "/docs#/status/status_v1_status_get")
    block = wait_for(
        browser,
        lambda d: d.find_element(By.ID, "operations-status-status_v1_status_get"),
        "the status operation",
    )
    if "is-open" not in (block.get_attribute("class") or ""):
        block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait_for(
        browser, lambda d: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"), "Try it out"
    ).pop().click()
    block.find_element(By.CSS_SELECTOR, ".execute").click()
    status = wait_for(
        browser,
        lambda d: block.find_elements(
            By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"
        ),
        "the Try-it-out answer",
    )[0]
    assert status.text.strip() == "200"
    body = block.find_element(By.CSS_SELECTOR, ".live-responses-table .microlight").text
    assert json.loads(body)["api_key_required"] is True
    with httpx.Client(base_url=server.url) as c:  # and without the key the route is closed
        assert c.get("/v1/status").status_code == 401


def test_screenshot_is_small() -> None:
    png = ROOT / "docs" / "dashboard.png"
    assert png.is_file() and png.stat().st_size < 200_000
    assert re.search(r"!\[[^\]]*\]\(docs/dashboard\.png\)", (ROOT / "README.md").read_text())
