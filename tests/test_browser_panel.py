"""A real browser (Debian's chromium, driven by Playwright) against a real hub: the agent panel and
a CRM page using spop.js. Skipped when chromium or Playwright is missing; .ci/run installs them."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hubproc import LOOPBACK, HubProcess

CHROMIUM = os.environ.get("SPOP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

TOKEN = "agent-token"
SOURCE = "source-token"
DOCS = Path(__file__).resolve().parent.parent / "docs"

CRM_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>CRM</title>
<script src="HUB/spop.js"></script></head><body><h1>CRM</h1><ul id="pops"></ul><p id="status"></p>
<script>
window.popped = []; window.statuses = []; window.release = null;
spop.signIn({token: "TOKEN"}).then(function () {
  spop.listen({media: "telephone", resource: ["2001", "2002"],
    onPop: function (pop) {
      window.popped.push(pop);
      var li = document.createElement("li"); li.textContent = pop.id + " " + pop.source;
      document.getElementById("pops").appendChild(li);
      if (pop.contact_data && pop.contact_data.hold === "yes") {
        return new Promise(function (resolve) { window.release = resolve; });  // ack held
      }
    },
    onContactChanged: function (change) { window.popped.push({change: change.change}); },
    onStatus: function (status) {
      window.statuses.push(status); document.getElementById("status").textContent = status;
    }});
});
</script></body></html>"""


class Site:
    """A little web server on loopback: the CRM page (another origin than the hub), and the
    CRM record URLs the panel's button opens (each request remembered)."""

    def __init__(self) -> None:
        self.page = ""
        self.requests: list[str] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path != "/favicon.ico":
                    site.requests.append(self.path)
                body = (site.page if self.path == "/crm.html" else "<title>record</title>").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.origin = f"http://{LOOPBACK}:{self.server.server_address[1]}"
        # shutdown() waits for the serve loop's next poll: 0.5 s by default, per test
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def site() -> Iterator[Site]:
    s = Site()
    yield s
    s.close()


@pytest.fixture
def hub(tmp_path: Path, site: Site) -> Iterator[HubProcess]:
    config = tmp_path / "spop.toml"
    config.write_text(
        "[hub]\n"
        f'browser_origins = ["{site.origin}"]\n'
        "panel_buttons = [\n"
        f'  {{label = "Open in CRM", url = "{site.origin}/record?phone={{source}}&ref={{contact_data[Ref]}}"}},\n'
        "]\n"
    )
    process = HubProcess(
        tmp_path / "hub",
        "--config",
        str(config),
        "--token",
        TOKEN,
        "--source-token",
        SOURCE,
    )
    with process:
        yield process


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One chromium for the module (a launch costs a second or two); each test its own page."""
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def publish(hub: HubProcess, **fields: Any) -> str:
    pop = {"media": "telephone", "resource": "2001", **fields}
    request = urllib.request.Request(
        f"{hub.http}/v1/pops",
        data=json.dumps(pop).encode(),
        headers={"Authorization": f"Bearer {SOURCE}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())["ids"][0]


def pending(hub: HubProcess) -> int:
    request = urllib.request.Request(
        f"{hub.http}/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return int(json.loads(answer.read())["pending"])


def sign_in(page: Any, hub: HubProcess, resource: str = "2001", token: str = TOKEN) -> None:
    page.goto(f"{hub.http}/panel")
    page.get_by_label("Extension or user id").fill(resource)
    page.get_by_label("Listener token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def test_panel_signs_in_shows_a_card_opens_the_crm_and_survives_a_restart(
    hub: HubProcess, site: Site, browser: Any
) -> None:
    expect = sync_api.expect
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    sign_in(page, hub)
    expect(page.get_by_role("status")).to_have_text("Up", timeout=15_000)
    expect(page.get_by_role("form", name="Sign in")).to_be_hidden()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()

    first = publish(
        hub,
        source="0612345678",
        destination="2468",
        queue_name="File d'attente des ventes",
        contact_description="Gold customer",
        wait_time=42,
        contact_data={"Ref": "A&B 7", "Contract": "C-1034"},
    )
    card = page.locator(f'li.card[data-pop-id="{first}"]')
    expect(card).to_be_visible(timeout=10_000)
    expect(card.get_by_role("heading")).to_have_text("Call from 0612345678")
    expect(card.locator('[data-field="destination"]')).to_have_text("2468")
    expect(card.locator('[data-field="queue_name"]')).to_have_text("File d'attente des ventes")
    expect(card.locator('[data-field="contact_description"]')).to_have_text("Gold customer")
    expect(card.locator('[data-field="wait_time"]')).to_have_text("0:42")
    expect(card.get_by_role("row", name="Contract")).to_contain_text("C-1034")
    expect(card.locator(".state")).to_have_text("Ringing")
    expect(page.locator("#announce")).to_have_text(
        "New contact from 0612345678, queue File d'attente des ventes"
    )
    DOCS.mkdir(exist_ok=True)
    if os.environ.get("SPOP_SCREENSHOT"):  # refresh docs/panel.png on demand
        page.screenshot(path=str(DOCS / "panel.png"))

    # the button: a URL template, values URL-encoded, opened in a new tab
    with context.expect_page() as opened:
        card.get_by_role("link", name="Open in CRM for 0612345678").click()
    crm = opened.value
    crm.wait_for_load_state()
    assert crm.url == f"{site.origin}/record?phone=0612345678&ref=A%26B%207"
    assert site.requests == ["/record?phone=0612345678&ref=A%26B%207"]

    assert wait_until(lambda: pending(hub) == 0)  # the panel acked it

    hub.restart()  # SIGKILL and start on the same ports and journal
    expect(page.get_by_role("status")).to_have_text("Up", timeout=20_000)
    second = publish(hub, source="0698765432")
    expect(page.locator(f'li.card[data-pop-id="{second}"]')).to_be_visible(timeout=10_000)
    ids = page.locator("li.card").evaluate_all("(cards) => cards.map(c => c.dataset.popId)")
    assert ids == [second, first]  # no duplicate, newest first
    assert wait_until(lambda: pending(hub) == 0)
    context.close()


def test_panel_refuses_a_wrong_token(hub: HubProcess, browser: Any) -> None:
    page = browser.new_page()
    sign_in(page, hub, token="wrong")
    sync_api.expect(page.get_by_role("alert")).to_have_text(
        "Sign-in refused: wrong or missing token", timeout=10_000
    )
    sync_api.expect(page.get_by_role("status")).to_have_text("Signed out")


def test_panel_is_usable_from_the_keyboard(hub: HubProcess, browser: Any) -> None:
    page = browser.new_page()
    page.goto(f"{hub.http}/panel")
    # focus starts in the form; Tab walks media → resource → token → Sign in
    page.get_by_label("Extension or user id").focus()
    page.keyboard.type("2001")
    page.keyboard.press("Tab")
    page.keyboard.type(TOKEN)
    page.keyboard.press("Enter")
    sync_api.expect(page.get_by_role("status")).to_have_text("Up", timeout=15_000)
    pop_id = publish(hub, source="0611111111")
    card = page.locator(f'li.card[data-pop-id="{pop_id}"]')
    sync_api.expect(card).to_be_visible(timeout=10_000)
    link = card.get_by_role("link", name="Open in CRM for 0611111111")
    link.focus()
    assert page.evaluate("document.activeElement.textContent") == "Open in CRM"


def test_spop_js_on_another_origin_receives_once_across_a_restart(
    hub: HubProcess, site: Site, browser: Any
) -> None:
    site.page = CRM_PAGE.replace("HUB", hub.http).replace("TOKEN", TOKEN)
    page = browser.new_page()
    page.goto(f"{site.origin}/crm.html")
    page.wait_for_function("window.statuses.includes('Up')", timeout=15_000)

    held = publish(hub, source="0600000001", contact_data={"hold": "yes"})
    page.wait_for_function("window.popped.length === 1 && window.release !== null")
    other = publish(hub, resource="2002", source="0600000002")
    assert pending(hub) == 2  # the first waits for its onPop to return; the second behind it

    hub.restart()  # the held pop is in the journal, sent again on the new stream
    page.wait_for_function(
        "window.statuses.lastIndexOf('Reconnecting') > 0 && window.statuses.at(-1) === 'Up'",
        timeout=20_000,
    )
    page.evaluate("window.release()")  # onPop returns: ack
    page.wait_for_function("window.popped.length === 2", timeout=10_000)
    assert wait_until(lambda: pending(hub) == 0)
    popped = page.evaluate("window.popped.map(p => p.id)")
    assert popped == [held, other]  # each once: the replayed copy of the held one was dropped
    page.wait_for_timeout(500)
    assert page.evaluate("window.popped.length") == 2


def wait_until(predicate: Any, timeout: float = 15.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def change_frame(change_id: str, pop: dict[str, Any], kind: str, **fields: Any) -> bytes:
    """A contact-update frame as CHANGE_CONTRACT.md fixes it (issue 12's hub sends these)."""
    body = {
        "id": change_id,
        "contact_id": pop["contact_id"],
        "media": pop["media"],
        "resource": pop["resource"],
        "pop_id": pop["id"],
        "change": kind,
        "at": "",
        "answered_by": "",
        "transferred_to": "",
        "consulted": "",
        "talk_time": "",
        "wait_time": "",
        "reason": "",
        **fields,
    }
    return json.dumps({"op": "change", "change": body}).encode() + b"\n"


def test_panel_card_follows_its_contact(browser: Any) -> None:
    from conftest import HubThread

    hub_thread = HubThread(token=TOKEN)
    try:
        hub = hub_thread.hub
        assert hub is not None
        base = f"http://{LOOPBACK}:{hub.http_port}"
        page = browser.new_page()
        page.goto(f"{base}/panel")
        page.get_by_label("Extension or user id").fill("3001")
        page.get_by_label("Listener token").fill(TOKEN)
        page.get_by_role("button", name="Sign in").click()
        sync_api.expect(page.get_by_role("status")).to_have_text("Up", timeout=15_000)

        async def publish_pop() -> dict[str, Any]:
            ids = await hub.publish(
                {"media": "telephone", "resource": "3001", "source": "0655", "contact_id": "k1"}
            )
            return {"id": ids[0], "media": "telephone", "resource": "3001", "contact_id": "k1"}

        pop = hub_thread.call(publish_pop())
        card = page.locator(f'li.card[data-pop-id="{pop["id"]}"]')
        sync_api.expect(card.locator(".state")).to_have_text("Ringing", timeout=10_000)

        def change(change_id: str, kind: str, **fields: Any) -> None:
            frame = change_frame(change_id, pop, kind, **fields)

            async def put() -> None:
                hub.delivery.publish(change_id, ("telephone", "3001"), frame, "k1")

            hub_thread.call(put())

        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        change("c1", "answered", answered_by="3001", at=now)
        sync_api.expect(card.locator(".state")).to_have_text(
            re.compile(r"^Talking 0:0\d$"), timeout=10_000
        )
        sync_api.expect(card).to_have_class(re.compile(r"\btalking\b"))
        change("c2", "ended", talk_time=65, reason="")
        sync_api.expect(card.locator(".state")).to_have_text("Ended · talked 1:05", timeout=10_000)
        sync_api.expect(page.locator("#announce")).to_have_text("Ended · talked 1:05")
        assert wait_until(lambda: not hub.delivery.pending)  # pop and changes acked
    finally:
        hub_thread.stop()


def test_panel_card_popped_again_stops_ringing(browser: Any) -> None:
    """A recall to the same agent (a second pop of the contact), then the hang-up: the newer card
    ends, the earlier one says `Popped again`, never `Ringing` for good."""
    from conftest import HubThread

    hub_thread = HubThread(token=TOKEN)
    try:
        hub = hub_thread.hub
        assert hub is not None
        page = browser.new_page()
        page.goto(f"http://{LOOPBACK}:{hub.http_port}/panel")
        page.get_by_label("Extension or user id").fill("3001")
        page.get_by_label("Listener token").fill(TOKEN)
        page.get_by_role("button", name="Sign in").click()
        sync_api.expect(page.get_by_role("status")).to_have_text("Up", timeout=15_000)

        def post(*events: dict[str, Any]) -> list[str]:
            done = hub_thread.call(hub.apply_contacts([{"contact_id": "k2", **e} for e in events]))
            return done["pops"]

        (first,) = post({"event": "queued", "source": "0655", "queue_name": "nightshift"},
                        {"event": "routed", "resource": "3001"})  # fmt: skip
        earlier = page.locator(f'li.card[data-pop-id="{first}"] .state')
        sync_api.expect(earlier).to_have_text("Ringing", timeout=10_000)
        (second,) = post({"event": "recalled", "resource": "3001"})
        newer = page.locator(f'li.card[data-pop-id="{second}"] .state')
        sync_api.expect(newer).to_have_text("Ringing", timeout=10_000)
        sync_api.expect(earlier).to_have_text(re.compile(r"^Popped again · at \S+"))
        # both pops acked first: an `ended` takes back a pop still unacked (`withdrawn`), as
        # it should; the page shows the card before its ack reaches the hub
        assert wait_until(lambda: hub_thread.status()["pending"] == 0)
        post({"event": "ended"})
        sync_api.expect(newer).to_have_text("Ended · abandoned", timeout=10_000)
        sync_api.expect(earlier).to_have_text(re.compile(r"^Popped again · at \S+"))
        assert (
            page.locator(f'li.card[data-pop-id="{first}"]').get_attribute("class") == "card ended"
        )
        assert wait_until(lambda: not hub.delivery.pending)
    finally:
        hub_thread.stop()


def test_spop_js_acks_after_a_sign_in_elsewhere_renewed_the_session(
    hub: HubProcess, site: Site, browser: Any
) -> None:
    site.page = CRM_PAGE.replace("HUB", hub.http).replace("TOKEN", TOKEN)
    page = browser.new_page()
    page.goto(f"{site.origin}/crm.html")
    page.wait_for_function("window.statuses.includes('Up')", timeout=15_000)
    # another tab signs in: the cookie now holds a new session, whose CSRF token differs
    page.evaluate(f"spop.signIn({{token: {json.dumps(TOKEN)}}})")
    pop_id = publish(hub, source="0600000003")
    page.wait_for_function("window.popped.length === 1", timeout=10_000)
    assert wait_until(lambda: pending(hub) == 0)  # the ack went through with the new token
    assert page.evaluate("window.popped.map(p => p.id)") == [pop_id]


def test_panel_notifies_when_the_tab_is_in_the_background(hub: HubProcess, browser: Any) -> None:
    context = browser.new_context()
    context.grant_permissions(["notifications"], origin=hub.http)
    # a background tab, and a Notification that records what the panel shows
    context.add_init_script(
        "Object.defineProperty(document, 'hidden', {get: () => window.__hidden === true});"
        "window.__notes = [];"
        "window.Notification = class { constructor(title, options) {"
        "  window.__notes.push({title: title, body: options.body, tag: options.tag}); }"
        "  close() {} static get permission() { return 'granted'; } };"
    )
    page = context.new_page()
    sign_in(page, hub)
    sync_api.expect(page.get_by_role("status")).to_have_text("Up", timeout=15_000)
    shown = publish(hub, source="0622222222")  # tab in front: a card, no notification
    sync_api.expect(page.locator(f'li.card[data-pop-id="{shown}"]')).to_be_visible(timeout=10_000)
    page.evaluate("window.__hidden = true")
    hidden = publish(hub, source="0633333333", queue_name="Sales", contact_description="Gold")
    sync_api.expect(page.locator(f'li.card[data-pop-id="{hidden}"]')).to_be_attached(timeout=10_000)
    assert page.evaluate("window.__notes") == [
        {"title": "Call from 0633333333", "body": "Sales · Gold", "tag": hidden}
    ]
    context.close()


def test_spop_js_acks_a_burst_larger_than_one_ack_request_holds(
    hub: HubProcess, site: Site, browser: Any
) -> None:
    """700 pops with ids of 100 characters handled at once: spop.js splits their acks into
    requests under the hub's 64 KiB body limit, and every pop leaves the hub."""
    site.page = CRM_PAGE.replace("HUB", hub.http).replace("TOKEN", TOKEN)
    page = browser.new_page()
    page.goto(f"{site.origin}/crm.html")
    page.wait_for_function("window.statuses.includes('Up')", timeout=15_000)
    ids = [f"{n:04d}-" + "x" * 95 for n in range(700)]  # 72 KB of ids in all
    pops = [{"id": i, "media": "telephone", "resource": "2001", "source": "0"} for i in ids]
    request = urllib.request.Request(
        f"{hub.http}/v1/pops",
        data=json.dumps(pops).encode(),
        headers={"Authorization": f"Bearer {SOURCE}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert json.loads(answer.read())["ids"] == ids
    page.wait_for_function("window.popped.length === 700", timeout=30_000)
    assert wait_until(lambda: pending(hub) == 0, 30)
    assert page.evaluate("window.popped.map(p => p.id)") == ids
