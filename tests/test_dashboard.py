"""The operator dashboard (``/ui``) in a real headless browser against the running system.

Debian's chromium (``/usr/bin/chromium``) driven by Playwright for Python with
the system browser's path: nothing is downloaded, ever (``playwright
install`` is never run). Every request the page makes is checked to go to the
app on 127.0.0.1 and nowhere else; the API key must never show in a URL or
the page's console.

Screenshots go to a folder under pytest's tmp path and are copied to
``reports/ui/`` in the repo (gitignored), so a person can look at them.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
import uuid
from pathlib import Path

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
REPO = Path(__file__).resolve().parent.parent
SHOTS_IN_REPO = REPO / "reports" / "ui"
WAIT_MS = 20_000
# A 1x1 PNG, for a hand-made backtest report.
PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium is not installed at {CHROMIUM}; the dashboard tests need it. Install it with "
                    "`command -v chromium || (apt-get update && apt-get install -y chromium)`", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright (the Python package) is missing: `pip install playwright` "
                    "(never `playwright install`: the tests drive the system chromium)", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui-screenshots")

    def save(page, name: str) -> Path:
        path = d / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        SHOTS_IN_REPO.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SHOTS_IN_REPO / path.name)
        return path

    return save


class Watched:
    """A page whose requests and console lines are recorded, and held to 127.0.0.1."""

    def __init__(self, browser, app):
        self.app = app
        self.ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.ctx.new_page()
        self.urls: list[str] = []
        self.outside: list[str] = []
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(m.text))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

        def route(r):
            self.urls.append(r.request.url)
            if r.request.url.startswith(app["url"] + "/") or r.request.url.startswith(("blob:", "data:")):
                r.continue_()
            else:
                self.outside.append(r.request.url)
                r.abort()

        self.page.route("**/*", route)

    def open(self, key: str | None = None):
        self.page.goto(self.app["url"] + "/ui")
        if key is not None:
            self.page.fill("#key-input", key)
            self.page.click("#key-submit")
            self.page.wait_for_selector("#keyed:not([hidden])", timeout=WAIT_MS)
        return self.page

    def check_clean(self) -> None:
        assert not self.outside, f"the page tried to reach beyond the app: {self.outside}"
        errors = [c for c in self.console if c.startswith("pageerror")]
        assert not errors, errors
        for key in self.app["keys"].values():
            assert not any(key in u for u in self.urls), "an API key appeared in a URL"
            assert not any(key in c for c in self.console), "an API key appeared in the page's console"

    def close(self) -> None:
        self.ctx.close()


@pytest.fixture
def watched(browser, trading_app):
    pages: list[Watched] = []

    def make() -> Watched:
        w = Watched(browser, trading_app)
        pages.append(w)
        return w

    yield make
    for w in pages:
        w.close()


def _h(app, role: str) -> dict[str, str]:
    return {"X-API-Key": app["keys"][role]}


def test_without_a_key_only_health_is_shown(trading_app, watched, shots):
    w = watched()
    page = w.open()
    page.wait_for_selector("#health [data-component='feeds']", timeout=WAIT_MS)
    assert page.is_hidden("#keyed")
    assert page.inner_text("#overall") in ("OK", "DEGRADED", "DOWN")
    # Nothing behind a key was asked for.
    assert not [u for u in w.urls if "/v1/" in u]
    for section in ("risk", "decisions", "registry", "feed-symbols"):
        assert page.inner_text(f"#{section}") == ""
    shots(page, "01-no-key-health-only")
    w.check_clean()


def test_live_data_changes_as_bars_arrive(trading_app, watched, shots):
    app = trading_app
    # A decision, so the decisions, ensemble and accuracy views have something to show.
    with httpx.Client(base_url=app["url"], timeout=30) as c:
        for _ in range(30):
            r = c.get("/v1/signal/SPY", headers=_h(app, "read"))
            if r.status_code == 200:
                break
            assert r.status_code == 503, r.text  # no bars yet
            time.sleep(0.5)
        assert r.status_code == 200, r.text
    w = watched()
    page = w.open(app["keys"]["read"])
    cell = "[data-testid='last-seq-SPY']"
    expect(page.locator(cell)).to_have_text(re.compile(r"^\d+$"), timeout=WAIT_MS)
    first = int(page.inner_text(cell))
    close = page.inner_text("[data-testid='last-close-SPY']")
    expect(page.locator(cell)).not_to_have_text(str(first), timeout=WAIT_MS)
    assert int(page.inner_text(cell)) > first
    assert close  # a price is shown beside it
    assert page.inner_text("[data-testid='role']") == "read"
    page.wait_for_selector("#decisions tr[data-decision]", timeout=WAIT_MS)
    page.wait_for_selector("#ensemble tr[data-member='baseline_mlp']", timeout=WAIT_MS)
    page.wait_for_selector("#registry [data-model='baseline_mlp']", timeout=WAIT_MS)
    page.wait_for_selector("#feed-sources td", timeout=WAIT_MS)
    page.wait_for_selector("#equity svg polyline", state="attached", timeout=WAIT_MS)
    # The key is kept for the tab's session only.
    assert page.evaluate("sessionStorage.getItem('raytrade.apiKey')") == app["keys"]["read"]
    assert page.evaluate("localStorage.length") == 0
    assert app["keys"]["read"] not in page.url
    shots(page, "02-live-read-key")
    w.check_clean()


def test_admin_halts_from_the_page_and_the_next_decision_is_refused(trading_app, watched, shots):
    app = trading_app
    w = watched()
    page = w.open(app["keys"]["admin"])
    state = "[data-testid='risk-state-default']"
    page.wait_for_selector(state, timeout=WAIT_MS)
    assert page.inner_text(state) == "TRADING"
    reason = f"dashboard test halt {uuid.uuid4().hex[:6]}"
    c = httpx.Client(base_url=app["url"], timeout=30)
    try:
        page.fill("#halt-reason", reason)
        page.click("#halt-btn")
        expect(page.locator(state)).to_have_text("HALTED", timeout=WAIT_MS)
        assert reason in page.inner_text("[data-testid='risk-reasons-default']")
        # An entry (adding to the position, or opening one): a halt stops entries.
        held = {p["symbol"]: p["qty"] for p in c.get("/v1/positions", headers=_h(app, "read")).json()["positions"]}
        side = "SELL" if held.get("SPY", 0) < 0 else "BUY"
        r = c.post("/v1/orders", json={"symbol": "SPY", "side": side, "quantity": 1}, headers=_h(app, "trade"))
        assert r.status_code == 422, r.text
        assert "halted" in r.json()["detail"] and reason in r.json()["detail"]
        d = c.post("/v1/decisions", json={"symbol": "SPY", "execute": True}, headers=_h(app, "trade")).json()
        # The ensemble picks the side: an entry is refused with the halt's reason; an exit
        # (reducing the position) is allowed whatever the halts say (core.risk), and a HOLD trades nothing.
        if d["action"] != "HOLD" and "skipped" not in d["risk"]["checks"].get("halt", {}):
            assert not d["executed"] and not d["risk"]["approved"], d
            assert any(reason in x for x in d["risk"]["reasons"]), json.dumps({k: d[k] for k in ("action", "target_position", "current_position", "risk")})
        page.wait_for_selector("#alerts li", timeout=WAIT_MS)
        shots(page, "03-admin-halted")
        page.click("#resume-btn")
        expect(page.locator(state)).to_have_text("TRADING", timeout=WAIT_MS)
    finally:
        c.post("/v1/risk/resume", json={}, headers=_h(app, "admin"))
    r = c.post("/v1/orders", json={"symbol": "SPY", "side": "BUY", "quantity": 1, "stop_loss": 1.0},
               headers=_h(app, "trade"))
    if r.status_code != 200:
        assert "halted" not in r.json()["detail"]
    # Resumed: a decision reaches the risk checks themselves (never refused as a malformed request).
    d = c.post("/v1/decisions", json={"symbol": "SPY", "execute": True}, headers=_h(app, "trade")).json()
    assert "request" not in d["risk"]["checks"], d["risk"]
    assert not any("halted" in x for x in d["risk"]["reasons"]), d["risk"]
    c.close()
    w.check_clean()


def test_a_read_key_cannot_halt_or_promote(trading_app, watched, shots):
    app = trading_app
    w = watched()
    page = w.open(app["keys"]["read"])
    page.wait_for_selector("[data-testid='risk-state-default']", timeout=WAIT_MS)
    assert page.is_disabled("#halt-btn") and page.is_disabled("#resume-btn")
    assert "admin key" in page.inner_text("#admin-hint")
    page.wait_for_selector("#registry button[data-action='rollback']", timeout=WAIT_MS)
    assert all(b.is_disabled() for b in page.query_selector_all("#registry button"))
    shots(page, "04-read-key-controls-disabled")
    with httpx.Client(base_url=app["url"], timeout=30) as c:
        for role in ("read", "trade"):
            r = c.post("/v1/risk/halt", json={"reason": "not allowed"}, headers=_h(app, role))
            assert r.status_code == 403, r.text
            r = c.post("/v1/models/baseline_mlp/promote", json={"version": 1}, headers=_h(app, role))
            assert r.status_code == 403, r.text
            assert c.post("/v1/models/baseline_mlp/rollback", headers=_h(app, role)).status_code == 403
        assert c.post("/v1/risk/halt", json={"reason": "no key"}).status_code == 401
        risk = c.get("/v1/status", headers=_h(app, "read")).json()["risk"]["default"]
        assert not risk["halted"]
    w.check_clean()


def test_admin_promotes_and_rolls_back_from_the_page(trading_app, watched, shots):
    import ray

    from actors.registry import REGISTRY_ACTOR

    app = trading_app
    reg = ray.get_actor(REGISTRY_ACTOR, namespace=app["settings"].ray.namespace)
    prod = ray.get(reg.get.remote("baseline_mlp", stage="production"), timeout=60)
    data = ray.get(reg.load.remote("baseline_mlp", prod["version"]), timeout=60)
    cand = ray.get(reg.register.remote("baseline_mlp", data, prod["task"],
                                       {**prod["metadata"], "parent_version": prod["version"]}), timeout=60)
    w = watched()
    page = w.open(app["keys"]["admin"])
    model = "#registry [data-model='baseline_mlp']"
    button = f"{model} button[data-action='promote'][data-version='{cand['version']}']"
    page.wait_for_selector(button, timeout=WAIT_MS)
    page.click(button)
    expect(page.locator("[data-testid='notice']")).to_contain_text(f"v{cand['version']} is now production",
                                                                   timeout=WAIT_MS)
    assert ray.get(reg.get.remote("baseline_mlp", stage="production"), timeout=60)["version"] == cand["version"]
    page.wait_for_selector(f"{model} button[data-action='promote'][data-version='{prod['version']}']", timeout=WAIT_MS)
    shots(page, "05-admin-promoted")
    page.click(f"{model} button[data-action='rollback']")
    expect(page.locator("[data-testid='notice']")).to_contain_text(f"v{prod['version']} is now production",
                                                                   timeout=WAIT_MS)
    assert ray.get(reg.get.remote("baseline_mlp", stage="production"), timeout=60)["version"] == prod["version"]
    with httpx.Client(base_url=app["url"], timeout=30) as c:
        r = c.post("/v1/models/no_such_model/rollback", headers=_h(app, "admin"))
        assert r.status_code == 404 and "no model named" in r.json()["detail"]
        r = c.post("/v1/models/baseline_mlp/promote", json={"version": 999}, headers=_h(app, "admin"))
        assert r.status_code == 404 and "no version 999" in r.json()["detail"]
        r = c.post("/v1/models/baseline_mlp/promote", json={"version": 0}, headers=_h(app, "admin"))
        assert r.status_code == 422
    w.check_clean()


def test_latest_backtest_reports_are_listed_and_open(trading_app, watched):
    app = trading_app
    name = f"zz-dashboard-test-{uuid.uuid4().hex[:8]}"
    d = REPO / "reports" / name
    d.mkdir(parents=True)
    try:
        (d / "index.html").write_text("<!doctype html><html><head><title>SPY sma &amp; test</title></head>"
                                      "<body><h1>report body</h1><p><img src='equity.png' alt='equity'></p></body></html>")
        (d / "equity.png").write_bytes(PNG_1PX)
        w = watched()
        page = w.open(app["keys"]["read"])
        link = f"#reports a[data-report='{name}']"
        page.wait_for_selector(link, timeout=WAIT_MS)
        assert page.inner_text(link) == "SPY sma & test"
        with page.context.expect_page(timeout=WAIT_MS) as popup:
            page.click(link)
        report = popup.value
        report.wait_for_selector("h1", timeout=WAIT_MS)
        assert report.inner_text("h1") == "report body"
        assert report.get_attribute("img", "src").startswith("data:image/png;base64,")
        assert report.url.startswith("blob:")
        with httpx.Client(base_url=app["url"], timeout=30) as c:
            assert c.get(f"/v1/reports/{name}").status_code == 401
            for bad in ("..", "..%2F..%2Fetc", "ui", "nope"):
                assert c.get(f"/v1/reports/{bad}", headers=_h(app, "read")).status_code == 404, bad
        w.check_clean()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_the_page_is_served_with_a_policy_that_keeps_it_local(trading_app):
    r = httpx.get(trading_app["url"] + "/ui", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "http://" not in r.text.replace("http://www.w3.org/2000/svg", "") and "https://" not in r.text
    state = httpx.get(trading_app["url"] + "/v1/ui/state", headers=_h(trading_app, "read"), timeout=30)
    assert state.status_code == 200
    body = json.dumps(state.json())
    for key in trading_app["keys"].values():
        assert key not in body
