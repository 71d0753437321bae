"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against a real daphne, a real
Celery worker and a real scheduler, all pointed at the test database (DESIGN.md §5–§6).

One daphne + worker + scheduler serve the whole module; every test logs in through /login/ and works on its
own runs. Nothing here sleeps and hopes: every wait is a Playwright expectation or `wait_for` with a deadline.

Screenshots land in test-artifacts/ (gitignored). With DEX_UPDATE_DOCS_SCREENSHOTS=1 the run list and a run
page are also copied to docs/ for the README.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.test import TransactionTestCase
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from runs import realtime, services
from runs.ai.testserver import serve_in_thread
from runs.models import Run, RunStatus, StepChunk
from runs.ops.audit import Actor
from tests.agents import ledger_lines
from tests.conftest import ROOT, SESSION, Proc, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}
ARTIFACTS = ROOT / "test-artifacts"
DOCS = ROOT / "docs"
PASSWORD = "pw-e2e-123456"
LIVE = 30_000  # ms: how long the page may take to show what the worker did
# The local LLM server answers t-llm-chain's "draft" step (streamed) slowly, word by word, so a test can open
# the run page in the middle of the stream.
# ~9 s of streaming: time enough to open the page mid-stream on a loaded CI machine.
SLOW_REPLY = " ".join(f"word{i:02d}" for i in range(60)) + " — the end."
LLM_SCRIPT = {"rules": [{"contains": "draft Summary", "reply": SLOW_REPLY, "chunk_delay": 0.15}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Daphne:
    """daphne serving dexweb.asgi on a fixed port; restartable on that same port."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Proc | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        args = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "dexweb.asgi:application"]
        self.proc = Proc(f"daphne{self.starts}", args, self.env, self.log_dir).start()
        self.proc.wait_for_log("Listening on TCP address")

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


@dataclass
class Stack:
    daphne: Daphne
    worker: Proc
    scheduler: Proc
    browser: Browser
    log_dir: Path
    llm_url: str


def _worker(env: dict[str, str], log_dir: Path) -> Proc:
    queue = env["DEX_DEFAULT_QUEUE"]
    args = [sys.executable, "-m", "celery", "-A", "dexweb", "worker", "-l", "info", "-P", "prefork", "-c", "2"]
    args += ["-Q", queue, "-n", f"e2e-{SESSION}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    proc = Proc("worker", args, env, log_dir).start()
    proc.wait_for_log("ready.")
    return proc


@pytest.fixture(scope="module")
def stack(dex_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One daphne, one worker (2 processes), one scheduler, the local LLM server and one Chromium for the module."""
    # Playwright's sync API keeps an event loop in this thread; the ORM calls of the tests are still synchronous.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    log_dir = tmp_path_factory.mktemp("e2e-logs")
    llm, llm_url = serve_in_thread(script=LLM_SCRIPT)
    local = {"kind": "openai", "base_url": llm_url, "models": ["*"]}
    dex_env = {**dex_env, "DEX_LLM_PROVIDERS": json.dumps({"local": local})}
    started: list[Any] = [llm]
    try:
        daphne = Daphne(dex_env, log_dir)
        started.append(daphne)
        daphne.start()
        worker = _worker(dex_env, log_dir)
        started.append(worker)
        scheduler = Proc("scheduler", [sys.executable, "manage.py", "scheduler"], dex_env, log_dir).start()
        started.append(scheduler)
        scheduler.wait_for_log("scheduler started")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                yield Stack(daphne, worker, scheduler, browser, log_dir, llm_url)
            finally:
                browser.close()
    finally:
        for proc in reversed(started):
            proc.stop()
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


def _deadlocked(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, psycopg.errors.DeadlockDetected):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@pytest.fixture(scope="module", autouse=True)
def _flush_despite_live_processes() -> Iterator[None]:
    """A transactional test ends with a TRUNCATE of every table, and here the worker, the scheduler (a tick every
    0.1 s) and daphne live on across tests and keep reading: Postgres may pick the TRUNCATE as a deadlock's
    victim. It is one statement, rolled back whole, so it is simply run again."""
    original = TransactionTestCase._fixture_teardown

    def fixture_teardown(self: TransactionTestCase) -> None:
        for attempt in range(5):
            try:
                return original(self)
            except Exception as exc:
                if attempt == 4 or not _deadlocked(exc):
                    raise

    TransactionTestCase._fixture_teardown = fixture_teardown  # type: ignore[method-assign]
    try:
        yield
    finally:
        TransactionTestCase._fixture_teardown = original  # type: ignore[method-assign]


@pytest.fixture
def users() -> dict[str, Any]:
    """An operator and a viewer. The groups come from a migration, but a transactional test flushes them."""
    permission = Permission.objects.get(codename="operate_runs", content_type__app_label="runs")
    operator_group, _ = Group.objects.get_or_create(name="operator")
    operator_group.permissions.add(permission)
    viewer_group, _ = Group.objects.get_or_create(name="viewer")
    model = get_user_model()
    operator = model.objects.create_user("olga", password=PASSWORD)
    operator.groups.add(operator_group)
    viewer = model.objects.create_user("victor", password=PASSWORD)
    viewer.groups.add(viewer_group)
    return {"operator": operator, "viewer": viewer}


@pytest.fixture
def context(stack: Stack, request: pytest.FixtureRequest) -> Iterator[BrowserContext]:
    ctx = stack.browser.new_context(base_url=stack.daphne.url, viewport=VIEWPORT)
    ctx.set_default_timeout(15_000)
    # Count the websocket messages htmx has applied: the first one is the snapshot the server sends on connect.
    ctx.add_init_script(
        "window.__dexWsMessages = 0;"
        "document.addEventListener('htmx:wsAfterMessage', () => { window.__dexWsMessages += 1; });"
    )
    try:
        yield ctx
    finally:
        ctx.close()


# A browser's own complaint about a socket that went away (the daphne restart test), and the htmx ws extension
# logging that socket's error event, are not page errors.
CONSOLE_NOISE = re.compile(r"WebSocket connection to|Failed to load resource|^\[object Event\]$")


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    """A page whose console errors (htmx's `htmx:oobErrorNoTarget`, CSP refusals, uncaught exceptions) fail the
    test that made them."""
    page = context.new_page()
    errors: list[str] = []
    page.on(
        "console", lambda msg: msg.type == "error" and not CONSOLE_NOISE.search(msg.text) and errors.append(msg.text)
    )
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    yield page
    assert not errors, f"console errors: {errors}"


def login(page: Page, username: str) -> None:
    page.goto("/login/")
    page.locator("input[name=username]").fill(username)
    page.locator("input[name=password]").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(re.compile(r"/$"))
    expect(page.locator("header .user")).to_have_text(username)


def header_status(page: Page, run_id: Any):
    return page.locator(f"#run-{run_id}-header h1 .status")


def step_rows(page: Page, run_id: Any):
    return page.locator(f"#run-{run_id}-steps > .step")


def wait_live(page: Page, *, snapshot: bool = True) -> None:
    """The page's websocket is open (base.html's #connection indicator, driven by static/js/dex.js) and, with
    `snapshot`, the snapshot the server sends on connect has been swapped in: it replaces the header and its
    action forms (an approval's form is kept, hx-preserve), so a test acts on the page the server last sent."""
    expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=LIVE)
    if snapshot:
        wait_js(page, "() => window.__dexWsMessages > 0", what="the snapshot")


def wait_js(page: Page, function: str, arg: Any = None, *, timeout: float = LIVE / 1000, what: str = "") -> Any:
    """Poll a JS function in the page until it returns something truthy. Not `page.wait_for_function`: its
    polling evaluates a string, which the dashboard's Content-Security-Policy (no 'unsafe-eval') refuses."""
    return wait_for(lambda: page.evaluate(function, arg), timeout=timeout, interval=0.05, what=what or function)


def shoot(page: Page, name: str, docs_name: str | None = None) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    if docs_name and os.environ.get("DEX_UPDATE_DOCS_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / docs_name)
    return path


def run_id_from_url(page: Page) -> str:
    match = re.search(r"/runs/([0-9a-f-]{36})/$", page.url)
    assert match, page.url
    return match.group(1)


# --- tests ---------------------------------------------------------------------------------------------------


def test_login_trigger_from_the_task_form_and_watch_every_step_finish_without_a_reload(
    stack: Stack, page: Page, users: dict[str, Any], tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"
    login(page, "olga")

    page.goto("/tasks/t-ten-steps/")
    page.locator("[name='payload-ledger']").fill(str(ledger))
    page.locator("[name='payload-pause']").fill("0.5")
    # Record every completed-step count the DOM goes through, and mark the document: a reload would lose both.
    page.get_by_role("button", name="Trigger").click()
    expect(page).to_have_url(re.compile(r"/runs/[0-9a-f-]{36}/$"))
    run_id = run_id_from_url(page)
    page.evaluate(
        """(runId) => {
            window.__dexNoReload = true;
            window.__dexCounts = [];
            const box = document.getElementById(`run-${runId}-steps`).parentElement;
            const count = () => box.querySelectorAll('.step.step-completed').length;
            window.__dexCounts.push(count());
            new MutationObserver(() => {
                const n = count();
                if (window.__dexCounts[window.__dexCounts.length - 1] !== n) window.__dexCounts.push(n);
            }).observe(box, {subtree: true, childList: true, attributes: true});
        }""",
        run_id,
    )

    expect(step_rows(page, run_id)).to_have_count(10, timeout=LIVE)
    expect(page.locator(f"#run-{run_id}-steps > .step.step-completed")).to_have_count(10, timeout=LIVE)
    expect(header_status(page, run_id)).to_have_class(re.compile(r"\bstatus-completed\b"), timeout=LIVE)
    expect(header_status(page, run_id)).to_have_text("Completed")
    expect(page.locator(f"#run-{run_id}-output")).to_contain_text('"total": 55')

    assert page.evaluate("window.__dexNoReload") is True, "the page was reloaded"
    counts = page.evaluate("window.__dexCounts")
    assert counts[-1] == 10 and len(set(counts)) >= 3, f"steps did not arrive one by one: {counts}"
    assert ledger_lines(ledger) == [f"s{i}" for i in range(1, 11)]
    assert Run.objects.get(pk=run_id).status == RunStatus.COMPLETED
    shoot(page, "run-page.png", docs_name="run-page.png")

    # A few more runs, so the list shows more than one status.
    others = [
        services.run_trigger(task_id="t-fails", payload={"ledger": str(tmp_path / "fails.txt")})[0],
        services.run_trigger(task_id="t-approval", payload={"order": "A-7"})[0],
        services.run_trigger(task_id="t-ten-steps", payload={"ledger": str(tmp_path / "more.txt")})[0],
    ]
    page.goto("/")
    expect(page.locator(f"#run-{run_id}")).to_contain_text("t-ten-steps")
    for other, status in zip(others, ("Failed", "Waiting", "Completed"), strict=True):
        expect(page.locator(f"#run-{other.pk}")).to_contain_text(status, timeout=LIVE)
    shoot(page, "run-list.png", docs_name="run-list.png")


def test_a_failed_steps_traceback_is_shown_and_retry_resumes_from_it(
    stack: Stack, page: Page, users: dict[str, Any], tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"
    run, _ = services.run_trigger(task_id="t-fails", payload={"ledger": str(ledger)})
    login(page, "olga")
    page.goto(f"/runs/{run.pk}/")
    wait_live(page)

    expect(header_status(page, run.pk)).to_have_class(re.compile(r"\bstatus-failed\b"), timeout=LIVE)
    bad = page.locator(f"#run-{run.pk}-steps > .step[data-key='bad']")
    expect(bad).to_have_class(re.compile(r"\bstep-failed\b"))
    expect(bad.locator("[data-attempt][data-status=failed]")).to_have_count(2)  # Retry(attempts=2): both drawn
    bad.locator(".step-label").click()  # the inspector opens beside the trace, and the URL says which step
    expect(page).to_have_url(re.compile(r"\?step=bad$"))
    inspector = page.locator("[data-step-inspector]")
    expect(inspector).to_contain_text("the step is broken")
    traceback = inspector.locator(".traceback").last
    expect(traceback).to_be_visible()
    expect(traceback).to_contain_text("ValueError: the step is broken")
    expect(traceback).to_contain_text('raise ValueError("the step is broken")')
    shoot(page, "run-failed.png")

    before = ledger_lines(ledger)
    assert before.count("ok") == 1 and before.count("bad") >= 1
    executions = Run.objects.get(pk=run.pk).executions

    # The Retry response (the header as it was right after the retry: queued) is held back until the websocket
    # has shown the retried run fail again: a slow response must not put the older header back.
    held: list[Any] = []
    page.route(f"**/runs/{run.pk}/retry/", lambda route: held.append((route, route.fetch())))
    page.get_by_role("button", name=re.compile("^Retry")).click()
    # The retried attempt runs step "bad" again (and fails again: it always does), never step "ok".
    wait_for(lambda: ledger_lines(ledger).count("bad") > before.count("bad"), timeout=30, what="bad to run again")
    wait_for(
        lambda: (
            Run.objects.get(pk=run.pk).status == RunStatus.FAILED and Run.objects.get(pk=run.pk).executions > executions
        ),
        timeout=30,
        what="the retried run to fail again",
    )
    after = Run.objects.get(pk=run.pk)
    expect(page.locator(f"#run-{run.pk}-header")).to_contain_text(f"Attempts{after.executions}", timeout=LIVE)
    expect(header_status(page, run.pk)).to_have_class(re.compile(r"\bstatus-failed\b"), timeout=LIVE)
    assert ledger_lines(ledger).count("ok") == 1, ledger_lines(ledger)

    wait_for(lambda: held, timeout=10, what="the retry request")
    route, response = held[0]
    # The held response was read before the websocket's last header (typically: queued or running).
    stale = re.search(r'-header" [^>]*data-version="(\d+)-(\d+)"', response.text())
    shown = page.locator(f"#run-{run.pk}-header").get_attribute("data-version") or ""
    assert stale and page.evaluate("([a, b]) => window.dexOlderVersion(a, b)", [f"{stale[1]}-{stale[2]}", shown])
    route.fulfill(response=response)
    expect(page.locator(f"#run-{run.pk}-notice")).to_contain_text("Retrying from the failed step.", timeout=LIVE)
    expect(header_status(page, run.pk)).to_have_class(re.compile(r"\bstatus-failed\b"))
    expect(page.locator(f"#run-{run.pk}-header")).to_contain_text(f"Attempts{after.executions}")


def test_cancel_stops_a_sleeping_run(stack: Stack, page: Page, users: dict[str, Any], tmp_path: Path) -> None:
    run, _ = services.run_trigger(task_id="t-sleep", payload={"ledger": str(tmp_path / "l.txt"), "seconds": 3600})
    login(page, "olga")
    page.goto(f"/runs/{run.pk}/")
    wait_live(page)
    expect(header_status(page, run.pk)).to_have_class(re.compile(r"\bstatus-waiting\b"), timeout=LIVE)
    nap = page.locator(f"#run-{run.pk}-steps > .step[data-key='nap']")
    expect(nap.locator("[data-attempt][data-status=waiting].seg-wait")).to_have_count(1)  # a wait, not a green bar
    expect(nap).to_contain_text("until")

    questions: list[str] = []

    def answer(dialog: Any) -> None:
        questions.append(dialog.message)
        if len(questions) == 1:
            dialog.dismiss()  # first: "no" — nothing happens
        else:
            dialog.accept()

    page.on("dialog", answer)
    page.get_by_role("button", name="Cancel", exact=True).click()
    wait_for(lambda: questions, timeout=10, what="the confirm")
    assert questions[0].startswith("Cancel this run?")
    assert Run.objects.get(pk=run.pk).status == RunStatus.WAITING
    page.get_by_role("button", name="Cancel", exact=True).click()

    expect(header_status(page, run.pk)).to_have_class(re.compile(r"\bstatus-canceled\b"), timeout=LIVE)
    expect(page.get_by_role("button", name="Cancel", exact=True)).to_have_count(0)
    expect(page.get_by_role("button", name="Resume canceled run")).to_be_visible()
    expect(page.get_by_role("button", name=re.compile("^Retry from failed step"))).to_have_count(0)
    assert Run.objects.get(pk=run.pk).status == RunStatus.CANCELED
    assert ledger_lines(tmp_path / "l.txt") == ["before"]


def test_an_approval_is_answered_from_the_run_page(stack: Stack, page: Page, users: dict[str, Any]) -> None:
    run, _ = services.run_trigger(task_id="t-approval", payload={"order": "A-42"})
    login(page, "olga")
    page.goto(f"/runs/{run.pk}/")
    wait_live(page)

    form = page.locator(f"#run-{run.pk}-header .approval-form")
    expect(form).to_be_visible(timeout=LIVE)
    expect(page.locator(f"#run-{run.pk}-header")).to_contain_text("Refund order A-42?")
    form.locator("[name$='amount']").fill("12.50")
    form.locator("[name$='reason']").fill("arrived")
    comment = form.locator("[name=comment]")
    comment.click()
    page.keyboard.type("looks right")

    # The run's header is pushed again while the operator is typing (any change of the run does that).
    page.evaluate("(id) => { window.__dexOldHeader = document.getElementById(`run-${id}-header`); }", str(run.pk))
    messages = page.evaluate("window.__dexWsMessages")
    realtime.publish_now(realtime.run_changed(run.pk, RunStatus.WAITING))
    realtime._publisher.flush()
    wait_js(page, "(n) => window.__dexWsMessages > n", messages, what="the pushed header")
    assert page.evaluate("!document.body.contains(window.__dexOldHeader)"), "the header was not swapped"
    # What was typed is still there, and the caret still in the comment: typing goes on where it was.
    page.keyboard.type(", refund it")
    expect(comment).to_have_value("looks right, refund it")
    form.locator("[name$='reason']").press("End")
    form.locator("[name$='reason']").press_sequentially(" broken")
    expect(form.locator("[name$='amount']")).to_have_value("12.50")
    form.get_by_role("button", name="Approve").click()

    expect(header_status(page, run.pk)).to_have_class(re.compile(r"\bstatus-completed\b"), timeout=LIVE)
    expect(page.locator(f"#run-{run.pk}-output")).to_contain_text("arrived broken")
    expect(page.locator(f"#run-{run.pk}-header .approval-form")).to_have_count(0)
    output = Run.objects.get(pk=run.pk).output
    assert output["answer"]["approved"] is True, output
    assert output["answer"]["data"]["reason"] == "arrived broken", output
    assert output["answer"]["comment"] == "looks right, refund it", output


def test_a_viewer_sees_no_actions_and_a_forged_post_is_refused(
    stack: Stack, page: Page, users: dict[str, Any], tmp_path: Path
) -> None:
    run, _ = services.run_trigger(task_id="t-sleep", payload={"ledger": str(tmp_path / "l.txt"), "seconds": 3600})
    wait_for(lambda: Run.objects.get(pk=run.pk).status == RunStatus.WAITING, timeout=30, what="the run to sleep")
    login(page, "victor")
    page.goto(f"/runs/{run.pk}/")
    wait_live(page)

    expect(header_status(page, run.pk)).to_have_class(re.compile(r"\bstatus-waiting\b"))
    expect(page.locator(f"#run-{run.pk}-header .actions")).to_have_count(0)
    for name in ("Cancel", re.compile("^Retry"), "Replay as a new run", "Fork from this step", "Approve"):
        expect(page.get_by_role("button", name=name)).to_have_count(0)

    csrf = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    response = page.request.post(f"/runs/{run.pk}/cancel/", headers={"X-CSRFToken": csrf})
    assert response.status == 403
    assert "CSRF" not in response.text(), "refused by the CSRF check, not by the permission"
    assert Run.objects.get(pk=run.pk).status == RunStatus.WAITING
    services.run_cancel(run=Run.objects.get(pk=run.pk), by=Actor.system("tests"))


SOCKET_OUTCOME = """(url) => new Promise((resolve) => {
    const ws = new WebSocket(url);
    let opened = false;
    ws.onopen = () => { opened = true; ws.close(); };
    ws.onclose = (event) => resolve({opened, code: event.code});
    setTimeout(() => resolve({opened, code: 'timeout'}), 10000);
})"""


def test_an_anonymous_websocket_is_refused(stack: Stack, context: BrowserContext, users: dict[str, Any]) -> None:
    anonymous = context.new_page()
    anonymous.goto("/login/")  # a page of the site: the socket's Origin is the dashboard's own
    url = f"ws://127.0.0.1:{stack.daphne.port}/ws/runs/"
    outcome = anonymous.evaluate(SOCKET_OUTCOME, url)
    assert outcome["opened"] is False and outcome["code"] != "timeout", outcome

    login(anonymous, "victor")  # the same socket from the same origin, logged in, does open
    assert anonymous.evaluate(SOCKET_OUTCOME, url)["opened"] is True


def test_the_run_page_reconnects_after_a_daphne_restart_and_catches_up(
    stack: Stack, page: Page, users: dict[str, Any], tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"
    login(page, "victor")
    run, _ = services.run_trigger(task_id="t-ten-steps", payload={"ledger": str(ledger), "pause": 0.4})
    page.goto(f"/runs/{run.pk}/")
    page.evaluate("window.__dexNoReload = true")
    wait_live(page)
    expect(page.locator(f"#run-{run.pk}-steps > .step.step-completed")).not_to_have_count(0, timeout=LIVE)

    stack.daphne.stop()
    expect(page.locator("#connection")).not_to_have_attribute("data-state", "live", timeout=LIVE)
    shown = page.locator(f"#run-{run.pk}-steps > .step.step-completed").count()
    wait_for(lambda: Run.objects.get(pk=run.pk).status == RunStatus.COMPLETED, timeout=30, what="the run to finish")
    assert shown < 10, "the run finished before daphne went away: nothing left to catch up on"

    stack.daphne.start()
    wait_live(page, snapshot=False)
    expect(page.locator(f"#run-{run.pk}-steps > .step.step-completed")).to_have_count(10, timeout=LIVE)
    expect(header_status(page, run.pk)).to_have_class(re.compile(r"\bstatus-completed\b"), timeout=LIVE)
    assert page.evaluate("window.__dexNoReload") is True, "the page was reloaded"


def test_a_page_opened_mid_stream_shows_the_text_so_far_then_follows_it_live(
    stack: Stack, page: Page, users: dict[str, Any]
) -> None:
    login(page, "victor")
    run, _ = services.run_trigger(task_id="t-llm-chain", payload={"topic": "e2e streaming", "stream": True})

    def streamed() -> str:
        return "".join(
            StepChunk.objects.filter(run=run, step_key="draft")
            .order_by("attempt", "seq")
            .values_list("text", flat=True)
        )

    so_far = wait_for(lambda: len(streamed().split()) >= 5 and streamed(), timeout=30, what="the draft to stream")
    assert len(so_far) < len(SLOW_REPLY), "the stream ended before the page was opened"

    response = page.goto(f"/runs/{run.pk}/")
    # The page itself (no websocket yet) already has the text so far, read from the stored chunks.
    assert so_far in response.text()
    draft = page.locator(f"#run-{run.pk}-steps > .step[data-key='draft']")
    tokens = draft.locator("pre.tokens")
    expect(tokens).to_contain_text(so_far.strip())
    at_load = len(tokens.text_content() or "")

    wait_live(page)
    # It keeps growing live, without a reload, then the settled step shows the whole answer.
    wait_js(
        page,
        "([sel, n]) => (document.querySelector(sel)?.textContent || '').length > n",
        [f"#run-{run.pk}-steps > .step[data-key='draft'] pre.tokens", at_load],
        what="more streamed text",
    )
    expect(draft).to_have_class(re.compile(r"\bstep-completed\b"), timeout=LIVE)
    draft.locator(".step-label").click()
    inspector = page.locator("[data-step-inspector]")
    expect(inspector.locator(".llm-text")).to_have_text(SLOW_REPLY, timeout=LIVE)
    expect(inspector).to_contain_text("Answered by")
    expect(header_status(page, run.pk)).to_have_class(re.compile(r"\bstatus-completed\b"), timeout=LIVE)


def test_fork_with_an_edited_output_and_replay_with_an_edited_payload_from_the_run_page(
    stack: Stack, page: Page, users: dict[str, Any], tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"
    run, _ = services.run_trigger(task_id="t-ten-steps", payload={"ledger": str(ledger), "steps": 3})
    login(page, "olga")
    wait_for(lambda: Run.objects.get(pk=run.pk).status == RunStatus.COMPLETED, timeout=30, what="the run to finish")
    page.goto(f"/runs/{run.pk}/")
    wait_live(page)

    # Fork from s3 with s2's output edited to 20: s1 and s2 are reused, only s3 runs again (1 + 20 + 3).
    s3 = page.locator(f"#run-{run.pk}-steps > .step[data-key='s3']")
    s3.locator(".step-label").click()
    inspector = page.locator("[data-step-inspector][data-inspected-key=s3]")
    inspector.locator("textarea[name=output]").fill("20")
    inspector.get_by_role("button", name="Fork from this step").click()
    expect(page).not_to_have_url(re.compile(str(run.pk)))
    fork_id = run_id_from_url(page)
    expect(page.locator(f"#run-{fork_id}-header")).to_contain_text(f"Forked from{run.pk} at s3")
    expect(page.locator(f"#run-{fork_id}-output")).to_contain_text('"total": 24', timeout=LIVE)
    assert ledger_lines(ledger) == ["s1", "s2", "s3", "s3"]

    # Replay the original with an edited payload: a new run, linked to it, with the new payload.
    page.goto(f"/runs/{run.pk}/")
    page.get_by_text("Replay (payload editable)").click()
    page.locator(f"#run-{run.pk}-replay-payload").fill(json.dumps({"ledger": str(ledger), "steps": 2}))
    page.get_by_role("button", name="Replay as a new run").click()
    expect(page).not_to_have_url(re.compile(f"{run.pk}|{fork_id}"))
    replay_id = run_id_from_url(page)
    expect(page.locator(f"#run-{replay_id}-header")).to_contain_text(f"Replay of{run.pk}")
    expect(page.locator(f"#run-{replay_id}-output")).to_contain_text('"total": 3', timeout=LIVE)
    assert Run.objects.get(pk=replay_id).payload["steps"] == 2


def test_the_list_shows_new_runs_live_and_a_bulk_cancel_by_filter_counts_first(
    stack: Stack, page: Page, users: dict[str, Any], tmp_path: Path
) -> None:
    login(page, "olga")
    page.goto("/?tag=e2e-bulk")
    wait_live(page)
    expect(page.locator("#runs-empty")).to_be_visible()

    # Runs started after the page opened appear on it, and change status in place.
    payload = {"ledger": str(tmp_path / "l.txt"), "seconds": 3600}
    runs = [services.run_trigger(task_id="t-sleep", payload=payload, tags=["e2e-bulk"])[0] for _ in range(3)]
    other, _ = services.run_trigger(task_id="t-sleep", payload=payload, tags=["elsewhere"])
    for run in runs:
        expect(page.locator(f"#run-{run.pk}")).to_contain_text("Waiting", timeout=LIVE)
    expect(page.locator(f"#run-{other.pk}")).to_have_count(0)  # not on this filtered page

    page.locator("input[name=scope][value=filter]").check()
    page.get_by_role("button", name="Cancel…").click()
    confirm = page.get_by_role("button", name="Yes, cancel 3 runs")
    expect(confirm).to_be_visible()
    assert all(Run.objects.get(pk=run.pk).status == RunStatus.WAITING for run in runs)  # a dry run changes nothing
    confirm.click()

    expect(page.locator("#bulk-result")).to_contain_text("Cancel: 3 runs done.")
    for run in runs:
        expect(page.locator(f"#run-{run.pk}")).to_contain_text("Canceled", timeout=LIVE)
    assert Run.objects.get(pk=other.pk).status == RunStatus.WAITING
    services.run_cancel(run=Run.objects.get(pk=other.pk), by=Actor.system("tests"))


# --- the trace view (DESIGN.md §6 hooks) -----------------------------------------------------------------------

TRACE_SHAPE = """(runId) => {
    const timeline = document.getElementById(`run-${runId}-steps`);
    const rows = [...timeline.querySelectorAll(':scope > [data-step-key]')];
    return rows.map((row) => {
        const track = row.querySelector('[data-track]').getBoundingClientRect();
        return {
            key: row.dataset.stepKey,
            status: row.dataset.status,
            trackX: Math.round(track.left),
            trackW: Math.round(track.width),
            segments: [...row.querySelectorAll('[data-attempt]')].map((seg) => ({
                attempt: seg.dataset.attempt,
                status: seg.dataset.status,
                left: parseFloat(seg.style.left),
                width: parseFloat(seg.style.width),
            })),
        };
    });
}"""


def test_the_trace_is_live_on_one_axis_and_looks_the_same_as_a_reload_at_the_end(
    stack: Stack, page: Page, users: dict[str, Any], tmp_path: Path
) -> None:
    login(page, "victor")
    run, _ = services.run_trigger(task_id="t-ten-steps", payload={"ledger": str(tmp_path / "l.txt"), "pause": 0.4})
    page.goto(f"/runs/{run.pk}/")
    wait_live(page)
    header = page.locator("[data-run-header]")

    # While it runs, the header keeps up: steps done grow and the duration ticks (no reload, no run event).
    done = header.locator("[data-run-steps-completed]")
    wait_js(
        page,
        "() => { const h = document.querySelector('[data-run-header]'); return h.dataset.status === 'running'"
        " && Number(h.querySelector('[data-run-steps-completed]').textContent) >= 3; }",
        what="three steps done while running",
    )
    first = header.locator("[data-run-duration]").text_content()
    wait_js(
        page,
        "(t) => document.querySelector('[data-run-duration]').textContent !== t",
        first,
        what="the duration to tick",
    )
    expect(header_status(page, run.pk)).to_have_class(re.compile(r"\bstatus-completed\b"), timeout=LIVE)
    expect(done).to_have_text("10")

    live = page.evaluate(TRACE_SHAPE, str(run.pk))
    page.reload()
    reloaded = page.evaluate(TRACE_SHAPE, str(run.pk))
    assert len(live) == 10 and [r["key"] for r in live] == [r["key"] for r in reloaded]
    # Rows aligned: every track starts at the same x and has the same width.
    assert len({(r["trackX"], r["trackW"]) for r in reloaded}) == 1, reloaded
    for seen, fresh in zip(live, reloaded, strict=True):
        assert [(s["attempt"], s["status"]) for s in seen["segments"]] == [("1", "completed")]
        assert abs(seen["segments"][0]["left"] - fresh["segments"][0]["left"]) < 2.5, (seen, fresh)
        assert abs(seen["segments"][0]["width"] - fresh["segments"][0]["width"]) < 2.5, (seen, fresh)
    # One time axis, not a scale per row: the steps follow each other left to right with similar widths.
    lefts = [r["segments"][0]["left"] for r in reloaded]
    assert lefts == sorted(lefts) and lefts[-1] > 75, lefts
    widths = [r["segments"][0]["width"] for r in reloaded]
    assert max(widths) < 3 * min(widths), widths
    expect(page.locator(f"#run-{run.pk}-steps .axis .tick").last).not_to_have_text("0 ms")


def test_retries_show_each_attempt_and_child_runs_nest_and_expand(
    stack: Stack, page: Page, users: dict[str, Any], tmp_path: Path
) -> None:
    login(page, "victor")
    flaky, _ = services.run_trigger(task_id="t-flaky", payload={"ledger": str(tmp_path / "l.txt"), "failures": 2})
    # One child per fan-out: two children finishing at the same instant have been seen to leave their parent
    # waiting for a later wake-up (an engine matter this test is not about).
    parent, _ = services.run_trigger(task_id="t-parent", payload={"n": 1})
    for run in (flaky, parent):
        wait_for(lambda run=run: Run.objects.get(pk=run.pk).status == RunStatus.COMPLETED, timeout=30, what="done")

    page.goto(f"/runs/{flaky.pk}/")
    wait_live(page)
    row = page.locator(f"#run-{flaky.pk}-steps > [data-step-key='flaky']")
    statuses = row.locator("[data-attempt]").evaluate_all("(els) => els.map((e) => e.dataset.status)")
    assert statuses == ["failed", "failed", "completed"], statuses
    expect(row.locator("[data-backoff]")).to_have_count(2)
    expect(row.locator("[data-attempt][data-status=failed]").first).to_have_attribute(
        "title", re.compile("boom on attempt 1")
    )
    row.locator(".step-label").click()
    inspector = page.locator("[data-step-inspector][data-inspected-key=flaky]")
    expect(inspector.locator(".attempt-error")).to_have_count(2)
    expect(inspector).to_contain_text("ConnectionError: boom on attempt 2")
    shoot(page, "trace-inspector.png", docs_name="trace-inspector.png")

    page.goto(f"/runs/{parent.pk}/")
    wait_live(page)  # the snapshot sent on connect replaces the trace: expand what it brought
    squares = page.locator(f"#run-{parent.pk}-steps > [data-step-key='squares']")
    children = squares.locator("[data-run-id]")
    expect(children).to_have_count(1)
    children.first.locator("summary").click()
    expect(children.first.locator("[data-step-key='square'] [data-attempt]")).to_have_count(1)
    shoot(page, "trace-children.png", docs_name="trace-children.png")

    # The list shows child runs under their parent, not as top-level rows.
    page.goto("/")
    expect(page.locator(f"#run-{parent.pk}")).to_be_visible()
    child_ids = list(Run.objects.filter(parent=parent).values_list("pk", flat=True))
    for child_id in child_ids:
        expect(page.locator(f"#run-{child_id}")).to_have_count(0)


def test_the_inspector_opens_from_a_shared_link_without_js(stack: Stack, users: dict[str, Any], tmp_path: Path) -> None:
    run, _ = services.run_trigger(task_id="t-fails", payload={"ledger": str(tmp_path / "l.txt")})
    wait_for(lambda: Run.objects.get(pk=run.pk).status == RunStatus.FAILED, timeout=30, what="the run to fail")
    ctx = stack.browser.new_context(base_url=stack.daphne.url, viewport=VIEWPORT, java_script_enabled=False)
    try:
        page = ctx.new_page()
        page.goto("/login/")
        page.locator("input[name=username]").fill("victor")
        page.locator("input[name=password]").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.goto(f"/runs/{run.pk}/?step=bad")
        inspector = page.locator("[data-step-inspector][data-inspected-key=bad]")
        expect(inspector).to_contain_text("ValueError")
        expect(inspector.locator(".traceback").last).to_contain_text("the step is broken")
        # Another row's link opens that step, as a plain link.
        page.locator(f"#run-{run.pk}-steps > [data-step-key='ok'] .step-label").click()
        expect(page).to_have_url(re.compile(r"\?step=ok$"))
        expect(page.locator("[data-step-inspector][data-inspected-key=ok]")).to_contain_text("Completed")
    finally:
        ctx.close()


# --- forms and error pages --------------------------------------------------------------------------------------


def test_trigger_forms_follow_the_signature_and_bad_input_is_a_form_error(
    stack: Stack, page: Page, users: dict[str, Any]
) -> None:
    login(page, "olga")
    page.goto("/tasks/hello-steps/")
    expect(page.locator(".description code").first).to_have_text("name")  # the docstring, as Markdown
    expect(page.locator(".facts").first).to_contain_text(stack.daphne.env["DEX_DEFAULT_QUEUE"])  # the queue consumed
    page.locator("[name='payload-steps']").fill("-5")
    page.locator("[name='payload-delay']").fill("-1")
    page.get_by_role("button", name="Trigger").click()
    # The server's form errors, every one at once (not the browser's own check, not a run that fails later).
    trigger = page.locator("#trigger")
    expect(trigger.locator(".has-errors")).to_have_count(2)
    expect(trigger).to_contain_text("greater than or equal to 1")
    expect(trigger).to_contain_text("greater than or equal to 0")
    assert not Run.objects.filter(task_id="hello-steps").exists()

    # A multi-line diff goes in a textarea and arrives as typed; left empty, the server says it is required.
    page.goto("/tasks/code-review-agent/")
    page.get_by_role("button", name="Trigger").click()
    expect(page.locator("#trigger .has-errors")).to_contain_text("This field is required")
    diff = page.locator("textarea[name='payload-diff']")
    diff.fill("--- a/x.py\n+++ b/x.py\n@@ -0,0 +1 @@\n+x = eval(y)\n")
    # A field of 1.2 MB: the dashboard's "too large" notice in the page, not a debug page swapped into the form.
    diff.evaluate("(el) => { el.value = 'x'.repeat(1200000); }")
    page.get_by_role("button", name="Trigger").click()
    expect(page.locator("#dex-error")).to_contain_text("Form too large")
    expect(page.locator("#trigger form")).to_be_visible()
    diff.fill("--- a/x.py\n+++ b/x.py\n@@ -0,0 +1 @@\n+x = eval(y)\n")
    page.get_by_role("button", name="Trigger").click()
    expect(page).to_have_url(re.compile(r"/runs/[0-9a-f-]{36}/$"))
    payload = Run.objects.get(pk=run_id_from_url(page)).payload
    assert payload["diff"].splitlines() == ["--- a/x.py", "+++ b/x.py", "@@ -0,0 +1 @@", "+x = eval(y)"]


def test_missing_pages_are_the_dashboards_own_404(stack: Stack, page: Page, users: dict[str, Any]) -> None:
    login(page, "victor")
    for path in ("/runs/does-not-exist/", "/runs/01a24500-0000-7000-8000-000000000000/"):
        response = page.goto(path)
        assert response is not None and response.status == 404
        expect(page.locator("[data-error-status='404']")).to_contain_text("Not found")
        expect(page.locator("body")).not_to_contain_text("URLconf")
