"""The web page of `echolm serve` in a real headless Chromium (Debian's `chromium` package,
driven by Playwright for Python; no browser download): chat, compare, rank and tokens modes
work end to end, every request stays on the server (no CDN), screenshots are not blank, and a
ranking made by clicking lands in the run's preference store.

Set ECHOLM_SCREENSHOTS=DIR to keep the screenshots."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch

from echolm.serve.schemas import Limits
from echolm.serve.testing import ServerThread, make_run

torch.set_num_threads(1)
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def _skip(reason: str) -> None:
    warnings.warn(f"BROWSER TESTS NOT RUN: {reason}", stacklevel=2)
    pytest.skip(f"BROWSER TESTS NOT RUN: {reason}")


@pytest.fixture(scope="module")
def server(prepared_run: Path, tmp_path_factory: pytest.TempPathFactory):
    run = make_run(tmp_path_factory.getbasetemp() / "serve_run", prepared_run)
    with ServerThread(run, Limits(max_tokens=64)) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip("the playwright package is missing (pip install playwright)")
    with sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        except Exception as e:  # a broken install must be visible, not silently passed
            _skip(f"{CHROMIUM} does not start: {str(e).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture
def page(browser, server: ServerThread):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    p = ctx.new_page()
    p.set_default_timeout(30_000)
    p.requests = []
    p.on("request", lambda r: p.requests.append(r.url))
    p.errors = []
    p.on("pageerror", lambda e: p.errors.append(str(e)))
    yield p
    assert not p.errors, p.errors
    assert all(u.startswith(server.url) or u.startswith("data:") for u in p.requests), \
        [u for u in p.requests if not u.startswith(server.url)]
    ctx.close()


def open_mode(page, server: ServerThread, mode: str) -> None:
    page.goto(f"{server.url}/#{mode}")
    page.wait_for_selector("body[data-ready='1']")


def shot(page, tmp_path: Path, name: str) -> Path:
    """Take a screenshot and check it is not blank: many colours, not one flat field."""
    from PIL import Image

    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path))
    img = Image.open(path).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours and len(colours) > 50, f"{name}: screenshot looks blank"
    top = max(c for c, _ in colours) / (img.width * img.height)
    assert top < 0.9, f"{name}: one colour covers {top:.0%} of the screenshot"
    keep = os.environ.get("ECHOLM_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    return path


def test_chat_streams_an_answer(page, server: ServerThread, tmp_path: Path) -> None:
    open_mode(page, server, "chat")
    assert page.locator("#stage option").all_inner_texts()[0].startswith("base")
    page.select_option("#stage", "sft")
    page.fill("#chat-input", "Hello, who are you?")
    page.press("#chat-input", "Enter")
    page.wait_for_selector(".msg.assistant .meta:has-text('tokens')")
    assert page.locator(".msg.user .bubble").inner_text() == "Hello, who are you?"
    assert page.locator(".msg.assistant .bubble").inner_text().strip()
    assert "sft" in page.locator(".msg.assistant .meta").inner_text()
    page.fill("#chat-input", "And again?")  # a second turn sends the whole conversation
    page.press("#chat-input", "Enter")
    page.wait_for_selector(".msg.assistant >> nth=1")
    page.wait_for_selector("#chat-send:not([hidden])")
    assert page.locator(".msg").count() == 4
    shot(page, tmp_path, "chat")


def test_compare_puts_every_stage_side_by_side(page, server: ServerThread,
                                               tmp_path: Path) -> None:
    open_mode(page, server, "compare")
    cols = page.locator("#compare-cols .col")
    assert [c.get_attribute("data-stage") for c in cols.all()] == ["base", "sft", "rl"]
    page.fill("#compare-input", "What is 2 + 2?")
    page.click("#compare-go")
    page.wait_for_function("!document.querySelector('#compare-go').disabled")
    for c in cols.all():
        assert "tokens" in c.locator("footer").inner_text()
        assert c.locator(".out").inner_text().strip()
    shot(page, tmp_path, "compare")


def test_ranking_in_the_browser_lands_in_the_store(page, server: ServerThread,
                                                   tmp_path: Path) -> None:
    open_mode(page, server, "rank")
    page.fill("#annotator", "browser-ada")
    page.select_option("#rank-k", "3")
    page.fill("#rank-prompt", "Describe the sea.")
    page.click("#rank-sample")
    page.wait_for_selector(".card >> nth=2")
    ids = [int(c.get_attribute("data-id")) for c in page.locator(".card").all()]
    assert page.locator("#rank-save").is_disabled()
    for k in (2, 0, 1):  # C best, then A, then B
        page.locator(".card").nth(k).click()
    assert page.locator(".card.ranked").count() == 3
    shot(page, tmp_path, "rank")
    page.click("#rank-save")
    page.wait_for_selector("#toast:has-text('Saved ranking')")
    from echolm.prefs import PreferenceStore

    with PreferenceStore(server.state.run_dir / "prefs.sqlite") as db:
        (r,) = db.rankings("browser-ada")
        assert r.prompt == "Describe the sea." and r.response_ids == [ids[2], ids[0], ids[1]]
        stored = {x["id"]: x for x in db.responses(r.prompt_id)}
        first = stored[ids[2]]
        assert first["stage"] == "rl" and first["checkpoint"].startswith("rl@")
        assert first["sampling"]["temperature"] == pytest.approx(0.8)


def test_tokens_show_alternatives(page, server: ServerThread, tmp_path: Path) -> None:
    open_mode(page, server, "tokens")
    page.fill("#tokens-input", "Say something.")
    page.click("#tokens-go")
    page.wait_for_selector("#tokens-stats:has-text('tokens')")
    toks = page.locator(".tok")
    assert toks.count() > 0
    assert toks.first.evaluate("e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"
    toks.first.hover()
    page.wait_for_selector("#tip:not([hidden])")
    assert page.locator("#tip .alt").count() == 5 and "%" in page.locator("#tip").inner_text()
    toks.nth(min(2, toks.count() - 1)).click()
    assert page.locator("#token-detail .alt").count() == 5
    shot(page, tmp_path, "tokens")


def test_key_and_stop_button(browser, server: ServerThread) -> None:
    """With an API key: the page asks for it; the Stop button ends the answer, and leaving
    frees the server's slot at once."""
    from echolm.serve.testing import slow_down

    with ServerThread(server.state.run_dir, Limits(max_tokens=200), api_key="pw") as s:
        slow_down(s, "sft", 0.05)  # 200 tokens would take 10 s
        ctx = browser.new_context(viewport={"width": 1000, "height": 700})
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        try:
            open_mode(page, s, "chat")
            assert page.locator("#knobs").get_attribute("open") is not None
            assert page.locator("#key-row").is_visible()
            page.fill("#api-key", "pw")
            page.fill("#max-tokens", "200")
            # seeded, so the answer runs long whatever the global generator did before:
            # with seed 0 the sft model's answer runs all 200 tokens (an unseeded one may
            # end before the Stop button can be pressed)
            page.fill("#seed", "0")
            page.select_option("#stage", "sft")
            page.fill("#chat-input", "Talk for a long time.")
            page.press("#chat-input", "Enter")
            page.wait_for_selector("#chat-stop:not([hidden])")
            page.wait_for_function(
                "document.querySelector('.msg.assistant .bubble').textContent.length > 0")
            assert s.state.inflight == 1
            page.click("#chat-stop")
            page.wait_for_selector(".msg.assistant .meta:has-text('stopped')")
            deadline = time.monotonic() + 2
            while s.state.inflight and time.monotonic() < deadline:
                time.sleep(0.02)
            assert s.state.inflight == 0
            assert s.state.engine.stats()["tokens"] < 150
        finally:
            ctx.close()
