"""The web UI in a real browser: Playwright driving Debian's Chromium against the fulcrum binary
(HTTPS, its own certificate), with simulated SEs from `fulcrum se-agent --simulate`.

Screenshots of every page are written to $FULCRUM_UI_ARTIFACTS (default: <target>/ui-screenshots);
they are artifacts, not part of the repository."""
import os
import re
import subprocess
import time

import pytest
import requests

from conftest import BINARY, PASSWORD, TARGET_DIR, Controller, build_package

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

CHROMIUM = os.environ.get("FULCRUM_CHROMIUM", "/usr/bin/chromium")
# As root, in a sandbox with no outside network: no Chromium sandbox, no background traffic.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = os.environ.get("FULCRUM_UI_ARTIFACTS", os.path.join(TARGET_DIR, "ui-screenshots"))
PAGES = ["dashboard", "pools", "virtualservices", "serviceengines", "images", "upgrades", "async"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SIMULATED_SES = 1000
ALL_SES = SIMULATED_SES + 3
READONLY_PASSWORD = "Read-only-1"

expect.set_options(timeout=15_000)


class Api:
    """The controller's API with HTTP Basic, for setting up and checking what the UI did."""

    def __init__(self, url):
        self.url = url
        self.http = requests.Session()
        self.http.auth = ("admin", PASSWORD)
        self.http.verify = False

    def __call__(self, method, path, **kwargs):
        return self.http.request(method, self.url + path, timeout=30, **kwargs)

    def ok(self, method, path, **kwargs):
        resp = self(method, path, **kwargs)
        assert resp.status_code < 300, (method, path, resp.status_code, resp.text)
        return resp.json() if resp.content else None

    def by_name(self, kind, name):
        results = self.ok("GET", "/api/%s" % kind, params={"name": name})["results"]
        return results[0] if results else None

    def wait_for(self, what, check, within=60):
        deadline = time.time() + within
        while time.time() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError("timed out waiting for " + what)


def start_agent(controller, api, group, count, prefix):
    token = api.ok("POST", "/api/sejointoken", json={"se_group_ref": "/api/serviceenginegroup?name=" + group})
    return subprocess.Popen(
        [BINARY, "se-agent", "--controller", controller.url, "--join-token", token["token"],
         "--data-dir", controller.data_dir("agents-" + group), "--simulate", str(count), "--name", prefix],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def se_count(api):
    return api.ok("GET", "/api/serviceengine?page_size=1")["count"]


@pytest.fixture(scope="module")
def system():
    """One controller over HTTPS; three simulated SEs in Default-Group (they take licenses
    first), and a fleet of a thousand more in a group of their own, for the long lists."""
    # Every simulated SE long-polls from 127.0.0.1: the per-address limit must let a thousand in.
    controller = Controller(extra=["--max-connections-per-client", "4096"])
    agents = []
    try:
        api = Api(controller.url)
        agents.append(start_agent(controller, api, "Default-Group", 3, "edge"))
        api.wait_for("three SEs to join", lambda: se_count(api) >= 3)
        api.ok("POST", "/api/serviceenginegroup", json={"name": "Fleet"})
        agents.append(start_agent(controller, api, "Fleet", SIMULATED_SES, "fleet"))
        yield controller, api
    finally:
        for agent in agents:
            agent.kill()
            agent.wait()
        controller.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Tab:
    """A browser page with its console errors and dialogs recorded."""

    def __init__(self, browser, base, viewport=DESKTOP):
        self.base = base
        self.context = browser.new_context(viewport=viewport, ignore_https_errors=True)
        self.page = self.context.new_page()
        self.errors = []
        self.dialogs = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append("uncaught: %s" % e))
        self.page.on("dialog", self._dialog)
        self.page.on("response", lambda r: r.status >= 400 and self.errors.append("(%d %s %s)" % (r.status, r.request.method, r.url)))

    def _dialog(self, dialog):
        self.dialogs.append(dialog.message)
        # Confirmations (delete) are accepted; an alert() would be an injected script.
        dialog.accept()

    def go(self, route=""):
        self.page.goto(self.base + "/" + ("#/" + route if route else ""))

    def login(self, user="admin", password=PASSWORD):
        self.go()
        self.page.get_by_label("User name").fill(user)
        self.page.get_by_label("Password").fill(password)
        self.page.get_by_role("button", name="Log in").click()
        expect(self.page.get_by_role("heading", name="Dashboard")).to_be_visible()

    def screenshot(self, name):
        os.makedirs(ARTIFACTS, exist_ok=True)
        self.page.screenshot(path=os.path.join(ARTIFACTS, name + ".png"), full_page=True)

    def close(self):
        self.context.close()


@pytest.fixture
def tab(browser, system):
    t = Tab(browser, system[0].url)
    yield t
    t.close()


def main(tab):
    return tab.page.locator("main")


def record_texts(page, selector):
    """Records the text of `selector` every time the page changes (the page is never reloaded:
    what it shows over time is its own refreshing); `seen(page)` returns the records."""
    page.evaluate("""(selector) => {
        window.seenTexts = [];
        new MutationObserver(() => {
            const el = document.querySelector(selector);
            if (el && window.seenTexts[window.seenTexts.length - 1] !== el.textContent) window.seenTexts.push(el.textContent);
        }).observe(document.querySelector('main'), {subtree: true, childList: true, attributes: true, characterData: true});
    }""", selector)


def seen(page):
    return page.evaluate("window.seenTexts")


def test_login_logout_and_the_end_of_a_session(tab):
    page = tab.page
    tab.go()
    expect(page.get_by_role("heading", name="Log in to Fulcrum")).to_be_visible()
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill("wrong-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("Invalid credentials")
    tab.errors.clear()  # the refused login's 401, which the alert shows
    tab.login()
    expect(page.locator("#username")).to_have_text("admin")
    # The API's own session: its cookie and CSRF token, no second authentication.
    names = {c["name"] for c in tab.context.cookies()}
    assert {"sessionid", "csrftoken"} <= names, names
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Log in to Fulcrum")).to_be_visible()
    expect(page.get_by_text("You are logged out.")).to_be_visible()
    resp = tab.context.request.get(tab.base + "/api/pool")
    assert resp.status == 401, "logging out ends the session on the controller"
    assert tab.errors == [], tab.errors
    # A session that ends while the page is open (idle expiry, or ended elsewhere) leads back
    # to the login page with a message, on the page's next refresh.
    tab.login()
    ended = tab.context.request.post(tab.base + "/logout")
    assert ended.status == 200
    expect(page.get_by_role("heading", name="Log in to Fulcrum")).to_be_visible(timeout=20_000)
    expect(page.get_by_text(re.compile("Your session has ended"))).to_be_visible()


def test_the_controllers_idle_timeout_logs_an_idle_page_out(browser, system):
    controller, api = system
    minutes = api.ok("GET", "/api/controllerproperties")["api_idle_timeout"]
    t = Tab(browser, controller.url)
    try:
        # The page's own refreshes keep the session in use, so the UI keeps the idle time itself:
        # jump the page's clock past the timeout with no key pressed and nothing clicked.
        t.page.clock.install()
        t.login()
        t.page.clock.fast_forward("%02d:10" % (minutes + 1))
        expect(t.page.get_by_role("heading", name="Log in to Fulcrum")).to_be_visible()
        expect(t.page.get_by_text("Your session expired after %d minutes without activity." % minutes)).to_be_visible()
        assert t.context.request.get(controller.url + "/api/pool").status == 401, "the session ended on the controller too"
    finally:
        t.close()


def test_the_keyboard_alone_logs_in_and_moves_between_pages(tab):
    page = tab.page
    tab.go()
    expect(page.get_by_label("User name")).to_be_focused()
    page.keyboard.type("admin")
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
    # Tab reaches the navigation; Enter follows a link and the new page's heading takes focus.
    for _ in range(30):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "Pools":
            break
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Pools", exact=True)).to_be_focused()
    assert tab.errors == [], tab.errors


def test_every_page_renders_at_desktop_and_phone_width_without_console_errors(browser, system):
    controller, api = system
    # Something on each page: a pool and a virtual service on an SE.
    pool = api.ok("POST", "/api/pool", json={"name": "shop", "servers": [{"ip": {"addr": "10.0.0.1", "type": "V4"}, "port": 8080}]})
    vip = api.ok("POST", "/api/vsvip", json={"name": "shop-vip", "vip": [{"vip_id": "0", "ip_address": {"addr": "10.0.0.100", "type": "V4"}}]})
    api.ok("POST", "/api/virtualservice", json={"name": "shop-vs", "services": [{"port": 80}], "pool_ref": pool["url"], "vsvip_ref": vip["url"]})
    for label, viewport in [("desktop", DESKTOP), ("phone", PHONE)]:
        t = Tab(browser, controller.url, viewport)
        try:
            t.login()
            for name in PAGES:
                t.go(name)
                expect(t.page.locator("main h1")).to_be_visible()
                # Its content (a table, cards, a form or an empty state), not only its frame.
                expect(t.page.locator("main table, main .card, main form, main p.empty").first).to_be_visible()
                t.page.wait_for_load_state("networkidle")
                t.screenshot("%s-%s" % (name, label))
                # Readable: nothing wider than the screen but what scrolls inside its own box.
                overflow = t.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                assert overflow <= 1, "%s is %d px wider than a %s screen" % (name, overflow, label)
            t.go("pools/" + pool["uuid"])
            expect(t.page.get_by_role("heading", name="Pool shop")).to_be_visible()
            t.screenshot("pool-%s" % label)
            assert t.errors == [], t.errors
        finally:
            t.close()


def test_pool_created_and_its_servers_added_disabled_enabled_and_removed(tab, system):
    _, api = system
    page = tab.page
    unsafe = []
    page.on("request", lambda r: r.method not in ("GET", "HEAD") and "/api/" in r.url and unsafe.append(r))
    tab.login()
    tab.go("pools")
    page.get_by_label("New pool name").fill("ui-pool")
    page.get_by_role("button", name="Create pool").click()
    expect(page.get_by_role("status").filter(has_text="Pool ui-pool created.")).to_be_visible()
    page.get_by_role("link", name="Open ui-pool").click()
    expect(page.get_by_role("heading", name="Pool ui-pool")).to_be_visible()
    expect(page.get_by_text("This pool has no servers.")).to_be_visible()

    page.get_by_label("Server address").fill("10.9.0.1")
    page.get_by_label("Port").fill("8080")
    page.get_by_role("button", name="Add server").click()
    row = page.get_by_role("row").filter(has_text="10.9.0.1:8080")
    expect(row).to_be_visible()
    assert [s["ip"]["addr"] for s in api.by_name("pool", "ui-pool")["servers"]] == ["10.9.0.1"]

    row.get_by_role("button", name="Disable").click()
    expect(row.get_by_text("DISABLED")).to_be_visible()
    assert api.by_name("pool", "ui-pool")["servers"][0]["enabled"] is False
    row.get_by_role("button", name="Enable").click()
    expect(row.get_by_text("ENABLED")).to_be_visible()
    assert api.by_name("pool", "ui-pool")["servers"][0]["enabled"] is True

    # A refusal shows the API's own message, and nothing changed.
    page.get_by_label("Server address").fill("not-an-address")
    page.get_by_role("button", name="Add server").click()
    expect(page.get_by_role("alert")).to_contain_text("Refused:")
    refusal = page.get_by_role("alert").inner_text()
    direct = api("PATCH", "/api/pool/" + api.by_name("pool", "ui-pool")["uuid"],
                 json={"add": {"servers": [{"ip": {"addr": "not-an-address", "type": "V4"}}]}})
    assert direct.status_code == 400 and direct.json()["error"] in refusal, (direct.text, refusal)
    assert len(api.by_name("pool", "ui-pool")["servers"]) == 1

    row.get_by_role("button", name="Remove").click()
    expect(page.get_by_text("This pool has no servers.")).to_be_visible()
    assert api.by_name("pool", "ui-pool")["servers"] in (None, [])

    # Every state-changing request carried the session's CSRF token.
    csrf = next(c["value"] for c in tab.context.cookies() if c["name"] == "csrftoken")
    assert len(unsafe) >= 5, [r.url for r in unsafe]
    for r in unsafe:
        assert r.headers.get("x-csrftoken") == csrf, (r.method, r.url)
    errors = [e for e in tab.errors if "400" not in e]  # the refused PATCH, shown above
    assert errors == [], errors


def test_a_request_without_the_csrf_token_is_refused_and_changes_nothing(tab, system):
    _, api = system
    pool = api.ok("POST", "/api/pool", json={"name": "csrf-pool"})
    tab.login()
    status = tab.page.evaluate(
        """async (uuid) => (await fetch('/api/pool/' + uuid, {method: 'DELETE', credentials: 'same-origin'})).status""",
        pool["uuid"])
    assert status == 401
    assert api.by_name("pool", "csrf-pool") is not None


def test_values_from_the_api_are_shown_as_text(tab, system):
    _, api = system
    name = "<img src=x onerror=alert(1)>"
    pool = api.ok("POST", "/api/pool", json={"name": name})
    tab.login()
    tab.go("pools")
    tab.page.get_by_label("Filter pools by name").fill("onerror")
    expect(tab.page.get_by_role("link", name=name)).to_be_visible()
    tab.go("pools/" + pool["uuid"])
    expect(tab.page.get_by_role("heading", name="Pool " + name)).to_be_visible()
    assert tab.page.locator("main img").count() == 0
    assert tab.dialogs == [], tab.dialogs
    assert tab.errors == [], tab.errors


def test_the_content_security_policy_forbids_inline_scripts(tab):
    resp = tab.context.request.get(tab.base + "/")
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
    assert tab.context.request.get(tab.base + "/ui/js/main.js").headers["content-security-policy"] == csp
    tab.login()
    ran = tab.page.evaluate("""() => new Promise((resolve) => {
        document.addEventListener('securitypolicyviolation', () => resolve(window.injected === true ? 'ran' : 'blocked'));
        const s = document.createElement('script');
        s.textContent = 'window.injected = true';
        document.body.append(s);
        setTimeout(() => resolve(window.injected === true ? 'ran' : 'no report'), 2000);
    })""")
    assert ran == "blocked"


def test_a_read_only_user_sees_no_write_actions_and_writes_are_still_refused(tab, system):
    _, api = system
    api.ok("POST", "/api/user", json={
        "name": "viewer", "username": "viewer", "password": READONLY_PASSWORD,
        "access": [{"role_ref": "/api/role?name=System-ReadOnly", "all_tenants": True}],
        "default_tenant_ref": "/api/tenant?name=admin"})
    pool = api.ok("POST", "/api/pool", json={"name": "ro-pool", "servers": [{"ip": {"addr": "10.7.0.1", "type": "V4"}}]})
    page = tab.page
    tab.login("viewer", READONLY_PASSWORD)
    tab.go("pools")
    expect(page.get_by_role("link", name="ro-pool")).to_be_visible()
    assert page.get_by_role("button", name="Create pool").count() == 0
    assert page.get_by_role("button", name="Delete").count() == 0
    tab.go("pools/" + pool["uuid"])
    expect(page.get_by_text("10.7.0.1:80")).to_be_visible()
    for label in ["Add server", "Remove", "Disable"]:
        assert page.get_by_role("button", name=label).count() == 0, label
    tab.go("images")
    expect(page.get_by_role("heading", name="Images", exact=True)).to_be_visible()
    assert page.get_by_role("button", name="Upload").count() == 0
    tab.go("upgrades")
    expect(page.get_by_text("Upgrade operations need an administrator")).to_be_visible()
    assert page.get_by_role("button", name="Start").count() == 0
    assert tab.errors == [], tab.errors
    # The API still refuses the write, with the CSRF token and all.
    status = page.evaluate("""async (uuid) => {
        const token = document.cookie.split('; ').find((c) => c.startsWith('csrftoken=')).split('=')[1];
        const r = await fetch('/api/pool/' + uuid, {method: 'PATCH', credentials: 'same-origin',
            headers: {'Content-Type': 'application/json', 'X-CSRFToken': token},
            body: JSON.stringify({delete: {servers: [{ip: {addr: '10.7.0.1', type: 'V4'}}]}})});
        return r.status;
    }""", pool["uuid"])
    assert status == 403
    assert len(api.by_name("pool", "ro-pool")["servers"]) == 1


def test_a_virtual_service_shows_the_se_it_runs_on(tab, system):
    _, api = system
    vs = api.ok("POST", "/api/virtualservice", json={"name": "web-vs", "services": [{"port": 8081}]})
    runtime = api.wait_for("web-vs to run on an SE", lambda: (
        lambda r: r if r["vip_summary"][0]["service_engine"] else None)(api.ok("GET", "/api/virtualservice/%s/runtime" % vs["uuid"])))
    se_name = runtime["vip_summary"][0]["service_engine"][0]["name"]
    tab.login()
    tab.go("virtualservices")
    tab.page.get_by_label("Filter virtual services by name").fill("web-vs")
    row = tab.page.get_by_role("row").filter(has_text="web-vs")
    expect(row).to_contain_text(se_name)
    expect(row).to_contain_text("OPER_UP")
    assert tab.errors == [], tab.errors


def test_long_lists_are_paged(tab, system):
    _, api = system
    servers = [{"ip": {"addr": "10.%d.%d.%d" % (i // 65536, (i // 256) % 256, i % 256), "type": "V4"}, "port": 80} for i in range(5000)]
    pool = api.ok("POST", "/api/pool", json={"name": "big-pool", "servers": servers})
    page = tab.page
    tab.login()
    tab.go("pools/" + pool["uuid"])
    expect(page.get_by_text("1–50 of 5000 (page 1 of 100)")).to_be_visible()
    assert page.locator("main tbody tr").count() == 50
    page.get_by_role("button", name="Next →").first.click()
    expect(page.get_by_text("51–100 of 5000 (page 2 of 100)")).to_be_visible()
    page.get_by_label("Filter servers by address").fill("10.0.19.")
    expect(page.locator("main tbody tr")).to_have_count(50)
    # A thousand SEs: one page of them at a time, from the API's own paging.
    api.wait_for("%d SEs to join" % ALL_SES, lambda: se_count(api) >= ALL_SES, within=240)
    tab.go("serviceengines")
    expect(page.get_by_text("1–50 of %d (page 1 of %d)" % (ALL_SES, (ALL_SES + 49) // 50))).to_be_visible()
    assert page.locator("main table").nth(1).locator("tbody tr").count() == 50
    page.get_by_label("Filter service engines by name").fill("fleet-099")
    expect(page.get_by_role("row").filter(has_text="fleet-099")).to_have_count(10)
    assert tab.errors == [], tab.errors


def test_upload_shows_progress_resumes_after_a_dropped_connection_and_the_image_appears(tab, system):
    controller, api = system
    path, tag, _ = build_package(controller, "se_patch", "30.2.1", "1p1", payload_bytes=20 << 20)
    page = tab.page
    dropped = []

    def drop_the_second_chunk(route):
        # The first attempt at the second chunk loses its connection; the UI must resume.
        if "bytes 8388608-" in route.request.headers.get("content-range", "") and not dropped:
            dropped.append(route.request.url)
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route(re.compile(r".*/api/image-upload/[^/]+$"), drop_the_second_chunk)
    tab.login()
    tab.go("images")
    record_texts(page, ".upload-progress .percent")
    page.get_by_label("Package file").set_input_files(path)
    page.get_by_role("button", name="Upload").click()
    expect(page.get_by_text("Image %s uploaded and verified." % tag)).to_be_visible(timeout=60_000)
    expect(page.locator(".upload-progress .percent")).to_have_text("100%")
    assert dropped, "the second chunk was sent"
    percents = [int(t.rstrip("%")) for t in seen(page)]
    assert any(0 < p < 100 for p in percents), percents
    assert percents[-1] == 100, percents
    expect(page.get_by_role("row").filter(has_text=tag)).to_contain_text("IMAGE_FSM_COMPLETED")
    image = api.by_name("image", tag)
    assert image["img_state"]["state"] == "IMAGE_FSM_COMPLETED"
    errors = [e for e in tab.errors if "ERR_CONNECTION_RESET" not in e]  # the dropped chunk
    assert errors == [], errors
    # Deleting it works; deleting what the controller runs is refused with the API's reason.
    page.get_by_role("row").filter(has_text=tag).get_by_role("button", name="Delete").click()
    expect(page.get_by_text("Image %s deleted." % tag)).to_be_visible()
    assert api.by_name("image", tag) is None


def upload(api, controller, kind, version):
    path, tag, _ = build_package(controller, kind, version, controller_binary=False)
    if api.by_name("image", tag) is None:
        with open(path, "rb") as f:
            api.ok("POST", "/api/image", files={"file": ("p.pkg", f, "application/octet-stream")})
    return tag


def test_upgrade_preview_shows_the_22_checks_as_the_api_does(tab, system):
    controller, api = system
    tag = upload(api, controller, "controller", "30.2.2")
    body = {"image_ref": tag, "system": True}
    page = tab.page
    tab.login()
    tab.go("upgrades")
    page.get_by_label("Operation", exact=True).select_option("upgrade")
    page.get_by_label("Scope", exact=True).select_option("system")
    page.get_by_label("Image", exact=True).select_option(tag)
    with page.expect_response(lambda r: r.url.endswith("/api/upgrade/preview")) as answered:
        page.get_by_role("button", name="Preview checks").click()
    sent = answered.value.request.post_data_json
    assert sent["image_ref"] == body["image_ref"] and sent["system"] is True, sent
    answer = answered.value.json()
    assert len(answer["checks"]) == 22
    preview = page.get_by_role("region", name="Preview")
    expect(preview.locator("tbody tr")).to_have_count(22)
    rows = preview.locator("tbody tr")
    for i, check in enumerate(answer["checks"]):
        row = rows.nth(i)
        expect(row).to_contain_text(check["check_code"])
        expect(row).to_contain_text(check["description"])
        expect(row).to_contain_text(check["state"])
        for detail in check["details"]:
            expect(row).to_contain_text(detail)
    expect(preview).to_contain_text("UPGRADE_PRE_CHECK_WARNING")
    tab.screenshot("upgrade-preview")
    assert tab.errors == [], tab.errors


def test_an_se_group_upgrade_started_in_the_ui_runs_to_completion(tab, system):
    controller, api = system
    tag = upload(api, controller, "controller", "30.2.2")
    # SEs never run a newer release than the controller: the controller goes first (by the API).
    api.ok("POST", "/api/upgrade", json={"image_ref": tag, "skip_warnings": True})
    def controller_upgraded():
        try:
            node = api.ok("GET", "/api/upgradestatusinfo/upgradestatusinfo-controller")
        except requests.ConnectionError:
            return False  # it restarts into its new version

        assert node["state"]["state"] != "UPGRADE_FSM_ERROR", (node["state"], node.get("upgrade_events"))
        return node["state"]["state"] == "UPGRADE_FSM_COMPLETED"
    api.wait_for("the controller upgrade", controller_upgraded, within=120)
    # The restarted controller has heard from the group's SEs again (its check says so).
    def group_reachable():
        try:
            checks = api.ok("POST", "/api/upgrade/preview", json={"image_ref": tag, "se_group_refs": ["Default-Group"]})["checks"]
        except requests.ConnectionError:
            return False
        return all(c["state"] == "UPGRADE_PRE_CHECK_SUCCESS" for c in checks if c["check_code"] == "SYSERR_CHECK_SE_REACHABILITY")
    api.wait_for("the SEs to be heard from after the restart", group_reachable, within=120)
    group = api.by_name("serviceenginegroup", "Default-Group")
    members = sorted(se["name"] for se in api.ok("GET", "/api/serviceengine", params={
        "refers_to": "serviceenginegroup:" + group["uuid"], "page_size": 200, "fields": "name"})["results"])
    assert len(members) == 3, members
    page = tab.page
    tab.login()
    tab.go("upgrades")
    page.get_by_label("Operation", exact=True).select_option("upgrade")
    page.get_by_label("Scope", exact=True).select_option("groups")
    page.get_by_label("Default-Group", exact=True).check()
    page.get_by_label("Image", exact=True).select_option(tag)
    page.get_by_role("button", name="Start", exact=True).click()
    # Without skip_warnings the warning (no backup) stops it, and the UI says which check.
    expect(page.get_by_role("alert")).to_contain_text("UPGRADE not started")
    expect(page.get_by_role("heading", name="The checks that stopped it")).to_be_visible()
    page.get_by_label("Skip warnings").check()
    record_texts(page, '[aria-label="Default-Group status"] .badge')
    page.get_by_role("button", name="Start", exact=True).click()
    expect(page.locator("main .outcome")).to_contain_text(re.compile(r"Upgrade of \S+ started"))
    status = page.get_by_role("region", name="Default-Group status")
    expect(status).to_contain_text("UPGRADE_FSM_COMPLETED", timeout=300_000)
    states = seen(page)
    assert states[-1] == "UPGRADE_FSM_COMPLETED", states
    assert any(s in ("UPGRADE_FSM_WAITING", "UPGRADE_FSM_IN_PROGRESS") for s in states), states
    expect(status.locator(".percent")).to_have_text("100%")
    for name in members:
        expect(status).to_contain_text(name)
    tab.screenshot("upgrade-completed")
    versions = {se["version"] for se in api.ok("GET", "/api/serviceengine", params={
        "refers_to": "serviceenginegroup:" + group["uuid"], "fields": "version"})["results"]}
    assert versions == {"30.2.2"}, versions
    # Rolling the group back from its status: the form is filled and its checks previewed.
    status.get_by_role("button", name="Roll back…").click()
    expect(page.get_by_label("Operation", exact=True)).to_have_value("rollback")
    expect(page.get_by_role("region", name="Preview").locator("tbody tr")).to_have_count(22)
    page.get_by_label("Skip warnings").check()
    page.get_by_role("button", name="Start", exact=True).click()
    expect(page.locator("main .outcome")).to_contain_text(re.compile(r"Rollback of \S+ started"))
    expect(status).to_contain_text("ROLLBACK", timeout=30_000)
    expect(status).to_contain_text("UPGRADE_FSM_COMPLETED", timeout=300_000)
    expect(status).to_contain_text("Version30.2.1-9001", use_inner_text=False)
    versions = {se["version"] for se in api.ok("GET", "/api/serviceengine", params={
        "refers_to": "serviceenginegroup:" + group["uuid"], "fields": "version"})["results"]}
    assert versions == {"30.2.1"}, versions
    # The image the controller runs (and the SEs keep for a rollback) cannot be deleted; the UI
    # shows the API's reason.
    tab.go("images")
    page.get_by_role("row").filter(has_text=tag).get_by_role("button", name="Delete").click()
    expect(page.get_by_role("alert")).to_contain_text("was not deleted")
    refused = api("DELETE", "/api/image/" + api.by_name("image", tag)["uuid"])
    assert refused.status_code == 409
    expect(page.get_by_role("alert")).to_contain_text(refused.json()["error"])
    errors = [e for e in tab.errors if "400" not in e and "409" not in e]  # the refusals shown above
    assert errors == [], errors


def test_async_patch_status_by_patch_id(tab, system):
    _, api = system
    api.ok("PATCH", "/api/controllerproperties", json={"replace": {"async_patch_merge_period": 60}})
    pool = api.ok("POST", "/api/pool", json={"name": "async-pool"})
    resp = api("PATCH", "/api/pool/%s?async_mode" % pool["uuid"], json={"add": {"servers": [{"ip": {"addr": "10.6.0.1", "type": "V4"}}]}})
    assert resp.status_code == 202, resp.text
    patch_id = resp.json()["patch_id"]
    tab.login()
    tab.go("async")
    tab.page.get_by_label("Patch id").fill(patch_id)
    tab.page.get_by_role("button", name="Look up").click()
    expect(main(tab).locator("dl.facts")).to_contain_text(patch_id)
    direct = api.ok("GET", "/api/pool-async/status/" + patch_id)
    expect(main(tab).locator("dl.facts")).to_contain_text(str(direct.get("state") or direct.get("status")))
    tab.page.get_by_label("Patch id").fill("no-such-patch")
    tab.page.get_by_role("button", name="Look up").click()
    expect(tab.page.get_by_role("alert")).to_be_visible()
    api.ok("PATCH", "/api/controllerproperties", json={"replace": {"async_patch_merge_period": 0}})
