"""The web chat page in a real browser: Debian's headless Chromium driven by Playwright, through Envoy
against the real stack. Sending and streaming, stopping, editing and regenerating, markdown with code
blocks, XSS payloads (typed by the user and forced into the model's answer with a grammar) rendered as
inert text, dark mode (the system setting and the toggle), and a wrong key's message.

Screenshots go to build/screenshots/ (test artefacts)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.common.config import REPO_ROOT
from tests.stack import RunningStack

pytestmark = pytest.mark.stack

CHROMIUM = Path("/usr/bin/chromium")
HAS_CHROMIUM = CHROMIUM.exists()
# RUNTIME.md: what Debian's chromium needs here (as root, headless, no background traffic).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO_ROOT / "build" / "screenshots"
MODEL = "smollm2-135m-instruct"
TIMEOUT_MS = 120_000
MARKDOWN_ANSWER = '# Plan\n\nSome **bold** words and `inline` code.\n\n```python\nprint("ok")\n```\n'
XSS_ANSWER = (
    '<script>window.__xss=3</script><img src=x onerror="window.__xss=4"> [link](javascript:window.__xss=5)'
)
XSS_PROMPT = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> hello'


def _gbnf_literal(text: str) -> str:
    """A GBNF grammar whose only sentence is `text`."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'root ::= "{escaped}"'


@pytest.fixture(scope="module")
async def context() -> AsyncIterator[Any]:
    if not HAS_CHROMIUM:
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (deploy/install-chromium.sh)")
    from playwright.async_api import async_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="ferry-chromium-")
    try:
        async with async_playwright() as playwright:
            browser_context = await playwright.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                headless=True,
                args=FLAGS,
                viewport={"width": 1100, "height": 700},
            )
            browser_context.set_default_timeout(TIMEOUT_MS)
            yield browser_context
            await browser_context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _conversation(stack: RunningStack, **fields: Any) -> str:
    with stack.http() as http:
        response = http.post("/api/v1/conversations", json={"model": MODEL, **fields})
        assert response.status_code == 200, response.text
        return str(response.json()["name"])


async def _open(context: Any, stack: RunningStack, *, key: str | None = None, scheme: str = "light") -> Any:
    page = await context.new_page()
    await page.emulate_media(color_scheme=scheme)
    await page.goto(stack.rest + "/chat/")
    await page.fill("#key", key or stack.admin_key)
    await page.click("#login button[type=submit]")
    return page


async def _open_conversation(page: Any, name: str) -> None:
    await page.wait_for_selector("#app:not([hidden])")
    await page.wait_for_selector("#login", state="hidden")
    await page.click(f'nav li[data-name="{name}"]')
    await page.wait_for_selector(f'nav li.active[data-name="{name}"]')


async def _send(page: Any, text: str) -> None:
    await page.fill("#input", text)
    await page.press("#input", "Enter")


async def _turn_done(page: Any) -> None:
    await page.wait_for_selector("#stop", state="hidden")
    await page.wait_for_selector(".message.assistant:not(.streaming)")


async def test_send_a_message_and_see_the_answer_stream(context: Any, stack: RunningStack) -> None:
    name = _conversation(stack, sampling={"max_tokens": 48, "temperature": 0})
    page = await _open(context, stack)
    await _open_conversation(page, name)
    await _send(page, "Write two sentences about the sea.")
    # Text appears in the answer while Stop is still offered: it streams in before the turn ends.
    await page.wait_for_function(
        "() => { const a = document.querySelector('.message.assistant.streaming .body');"
        " return a && a.textContent.trim().length > 0 && !document.getElementById('stop').hidden; }"
    )
    await _turn_done(page)
    answer = await page.text_content(".message.assistant .body")
    assert answer and answer.strip()
    assert await page.text_content(".message.user .body") == "Write two sentences about the sea."
    await page.screenshot(path=str(SCREENSHOTS / "chat-streamed.png"))
    await page.close()


async def test_stop_a_long_answer(context: Any, stack: RunningStack) -> None:
    name = _conversation(stack, sampling={"max_tokens": 1500, "ignore_eos": True})
    page = await _open(context, stack)
    await _open_conversation(page, name)
    await _send(page, "Tell a very long story.")
    await page.wait_for_function(
        "() => { const a = document.querySelector('.message.assistant.streaming .body');"
        " return a && a.textContent.trim().length > 0; }"
    )
    await page.click("#stop")
    await _turn_done(page)
    await page.wait_for_selector(".message.assistant .meta >> text=stopped")
    with stack.http() as http:
        last = http.get(f"/api/v1/{name}/messages").json()["messages"][-1]
    assert last["finish_reason"] == "FINISH_REASON_CANCELLED" and last["usage"]["completion_tokens"] < 1500
    await page.close()


async def test_edit_and_regenerate(context: Any, stack: RunningStack) -> None:
    name = _conversation(stack, sampling={"max_tokens": 12, "temperature": 0.8})
    page = await _open(context, stack)
    await _open_conversation(page, name)
    await _send(page, "Say a colour.")
    await _turn_done(page)
    await page.click(".message.user button.edit")
    await page.fill(".message.user textarea.edit-input", "Say an animal.")
    await page.click(".message.user button.save")
    await _turn_done(page)
    await page.wait_for_selector(".message.user .meta >> text=version 2 of 2")
    assert await page.text_content(".message.user .body") == "Say an animal."
    await page.click(".message.assistant button.regenerate")
    await _turn_done(page)
    await page.wait_for_selector(".message.assistant .meta >> text=version 2 of 2")
    with stack.http() as http:
        everything = http.get(f"/api/v1/{name}/messages", params={"all_versions": True}).json()["messages"]
    assert [m["content"] for m in everything if m["role"] == "ROLE_USER"] == [
        "Say a colour.",
        "Say an animal.",
    ]
    assert len(everything) == 5, "the earlier message and answers stay stored"
    await page.screenshot(path=str(SCREENSHOTS / "chat-edited.png"))
    await page.close()


async def test_markdown_and_code_blocks_are_rendered(context: Any, stack: RunningStack) -> None:
    name = _conversation(
        stack, constraint={"gbnf": _gbnf_literal(MARKDOWN_ANSWER)}, sampling={"max_tokens": 64}
    )
    page = await _open(context, stack)
    await _open_conversation(page, name)
    await _send(page, "Make a plan.")
    await _turn_done(page)
    body = ".message.assistant .body"
    assert await page.text_content(f"{body} h3") == "Plan"
    assert await page.text_content(f"{body} strong") == "bold"
    assert await page.text_content(f"{body} p code") == "inline"
    assert await page.text_content(f"{body} pre code.language-python") == 'print("ok")'
    await page.screenshot(path=str(SCREENSHOTS / "chat-markdown.png"))
    await page.close()


async def test_xss_in_the_prompt_and_in_the_answer_is_inert(context: Any, stack: RunningStack) -> None:
    name = _conversation(stack, constraint={"gbnf": _gbnf_literal(XSS_ANSWER)}, sampling={"max_tokens": 96})
    page = await _open(context, stack)
    await _open_conversation(page, name)
    await _send(page, XSS_PROMPT)
    await _turn_done(page)
    await page.wait_for_load_state("networkidle")
    assert await page.evaluate("() => window.__xss") is None, "no payload ran"
    assert await page.locator("#messages script, #messages img, #messages [onerror]").count() == 0
    assert await page.locator('#messages a[href^="javascript"]').count() == 0
    assert await page.text_content(".message.user .body") == XSS_PROMPT, "shown as the text it is"
    assert "<script>window.__xss=3</script>" in (await page.text_content(".message.assistant .body") or "")
    await page.close()


async def test_dark_mode_follows_the_system_and_toggles(context: Any, stack: RunningStack) -> None:
    page = await _open(context, stack, scheme="dark")
    await page.wait_for_selector("#app:not([hidden])")
    await page.evaluate("() => localStorage.removeItem('ferry.theme')")
    await page.reload()
    await page.wait_for_selector("#app:not([hidden])")
    background = "() => getComputedStyle(document.body).backgroundColor"
    assert await page.evaluate(background) == "rgb(13, 17, 23)", "dark, as the system says"
    await page.screenshot(path=str(SCREENSHOTS / "chat-dark.png"))
    await page.click("#theme")
    assert await page.evaluate(background) == "rgb(255, 255, 255)", "the toggle switches to light"
    await page.click("#theme")
    assert await page.evaluate(background) == "rgb(13, 17, 23)"
    await page.evaluate("() => localStorage.removeItem('ferry.theme')")
    await page.close()


async def test_a_wrong_key_is_a_clear_message(context: Any, stack: RunningStack) -> None:
    page = await _open(context, stack, key="fk-this-is-not-a-key")
    await page.wait_for_selector("#login-error:not(:empty)")
    message = await page.text_content("#login-error")
    assert message and "API key was not accepted" in message
    assert await page.evaluate("() => sessionStorage.getItem('ferry.key')") is None, (
        "a refused key is not kept"
    )
    await page.screenshot(path=str(SCREENSHOTS / "chat-wrong-key.png"))
    await page.close()
