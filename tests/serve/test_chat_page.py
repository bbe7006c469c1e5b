"""The chat page in a real browser: headless Debian chromium (Selenium, no driver download) against a real uvicorn
server over a tiny random Llama. Streaming, Stop (the server aborts the request), thumbs into the feedback file,
Regenerate, the system prompt and temperature, errors, the API key; and against a second server with a RAG store
(two markdown files indexed with the real MiniLM): the "Answer from documents" toggle, the sources under an answer,
"no matching documents".

Two seams on the servers' engines, nothing else faked: every request ignores EOS (answers run to max_tokens, so
none comes out empty by chance), and `server.delay` slows each engine step so a stream lasts long enough to be
watched growing or stopped. One test alone replaces the page's fetch with a scripted stream: the tiny model's
random bytes hardly ever cite a source as [n], and that test is about how cited sources are drawn."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait
from tiny import llama_folder

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromedriver (/usr/bin/chromium, /usr/bin/chromedriver)",
)


MAX_TOKENS = 40


@dataclasses.dataclass
class Server:
    url: str
    app: Any
    feedback: Path
    delay: float = 0.0  # seconds slept before each engine step
    submitted: list[Any] = dataclasses.field(default_factory=list)  # scheduler jobs, in order
    aborted: list[Any] = dataclasses.field(default_factory=list)

    def get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=5) as r:
            return json.loads(r.read())

    def ratings(self) -> list[dict[str, Any]]:
        if not self.feedback.exists():
            return []
        return [json.loads(line) for line in self.feedback.read_text().splitlines()]


@contextlib.contextmanager
def serving(tmp: Path, context: int, rag_store: Path | None = None) -> Iterator[Server]:
    """uvicorn in a thread over a tiny random Llama, with the engine seams described above."""
    import uvicorn

    from lmforge.serve import ServeOptions, build
    from lmforge.weights.load import load

    folder = llama_folder(tmp / "tiny", layers=2, chat_template=True, context=context)
    model, tokenizer = load(folder, dtype="float32")
    app = build(model, tokenizer, ServeOptions(name="tiny", feedback=tmp / "feedback.jsonl", max_tokens=MAX_TOKENS,
                                               rag_store=None if rag_store is None else str(rag_store)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    info = Server(f"http://127.0.0.1:{port}", app, tmp / "feedback.jsonl")

    scheduler = app.state.served.scheduler
    engine, step, add, submit, abort = scheduler.engine, scheduler.engine.step, scheduler.engine.add, \
        scheduler.submit, scheduler.abort

    def slow_step() -> Any:
        if info.delay:
            time.sleep(info.delay)
        return step()

    def add_no_eos(prompt: list[int], params: Any = None, *args: Any) -> int:
        return add(prompt, dataclasses.replace(params, ignore_eos=True), *args)

    def record(into: list[Any], call: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def recorded(job: Any) -> Any:
            into.append(job)
            return call(job)
        return recorded

    engine.step, engine.add = slow_step, add_no_eos
    scheduler.submit, scheduler.abort = record(info.submitted, submit), record(info.aborted, abort)

    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield info
    finally:
        uv.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("chat-page"), context=512) as info:  # room for a few turns
        yield info


@pytest.fixture(scope="module")
def rag_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two markdown files indexed with the real default embedding model (MiniLM)."""
    from lmforge.rag.index import index_paths
    from lmforge.rag.store import open_store

    tmp = tmp_path_factory.mktemp("chat-page-rag")
    docs = tmp / "docs"
    docs.mkdir()
    (docs / "festival.md").write_text(
        "# The Zorblax festival\n\nThe Zorblax festival is held every March in Quibbleton.\n")
    (docs / "garden.md").write_text("# Tomatoes\n\nTomatoes need full sun and regular watering.\n")
    store = open_store(tmp / "store.db")
    try:
        index_paths([docs], store)
    finally:
        store.close()
    return tmp / "store.db"


@pytest.fixture(scope="module")
def rag_server(tmp_path_factory: pytest.TempPathFactory, rag_store: Path) -> Iterator[Server]:
    # the prompt holds the grounding instructions and the sources as well: a longer context than `server`'s
    with serving(tmp_path_factory.mktemp("chat-page-rag-server"), context=1024, rag_store=rag_store) as info:
        yield info


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(arg)
    options.binary_location = str(CHROMIUM)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    yield browser
    browser.quit()


RECORD_FETCH = """
window.__requests = [];
const original = window.fetch;
window.fetch = (url, options) => {
  const body = options && options.body ? JSON.parse(options.body) : null;
  window.__requests.push({url: String(url), body});
  return original(url, options);
};
"""


def load_page(driver: WebDriver, server: Server) -> Iterator[WebDriver]:
    server.delay = 0.0
    driver.get(server.url + "/")
    wait(driver, 10).until(lambda d: d.find_element(By.ID, "status").text == "ready")
    driver.execute_script(RECORD_FETCH)
    yield driver
    server.delay = 0.0


@pytest.fixture
def page(driver: WebDriver, server: Server) -> Iterator[WebDriver]:
    """A freshly loaded page, its model known, every fetch it makes recorded in window.__requests."""
    yield from load_page(driver, server)


@pytest.fixture
def rag_page(driver: WebDriver, rag_server: Server) -> Iterator[WebDriver]:
    """The same, served by the server with a RAG store."""
    yield from load_page(driver, rag_server)


def wait(driver: WebDriver, seconds: float = 10) -> WebDriverWait:
    return WebDriverWait(driver, seconds, poll_frequency=0.02)


def text(driver: WebDriver, element: WebElement) -> str:
    return driver.execute_script("return arguments[0].textContent", element)


def ask(driver: WebDriver, prompt: str) -> None:
    box = driver.find_element(By.ID, "prompt")
    lines = prompt.split("\n")
    for i, line in enumerate(lines):
        box.send_keys(line)
        if i < len(lines) - 1:
            box.send_keys(Keys.SHIFT, Keys.ENTER)  # a newline, not a send
    box.send_keys(Keys.ENTER)


def assistants(driver: WebDriver) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")


def finished(driver: WebDriver, seconds: float = 15) -> WebElement:
    """Wait for the last answer to end (stream over, Stop hidden); return its bubble."""
    def done(d: WebDriver) -> WebElement | bool:
        last = assistants(d)[-1] if assistants(d) else None
        stop = d.find_element(By.ID, "stop")
        return last if last is not None and last.get_attribute("data-finish") and not stop.is_displayed() else False
    return wait(driver, seconds).until(done)


def chat_requests(driver: WebDriver) -> list[dict[str, Any]]:
    recorded = driver.execute_script("return window.__requests")
    return [r["body"] for r in recorded if r["url"].endswith("/chat/completions")]


SNAPSHOT = """
const bubble = arguments[0];
if (!bubble.classList.contains("streaming")) return null;
const shown = (id) => document.getElementById(id).offsetParent !== null;
return {length: bubble.querySelector(".content").textContent.length, stop: shown("stop"), send: shown("send")};
"""


def content(driver: WebDriver, bubble: WebElement) -> str:
    return text(driver, bubble.find_element(By.CSS_SELECTOR, ".content"))


def test_send_streams_the_answer_and_keeps_the_conversation(page: WebDriver, server: Server) -> None:
    server.delay = 0.03  # ~1.2 s for the 40 tokens: slow enough to watch
    ask(page, "line one\nline two")
    users = page.find_elements(By.CSS_SELECTOR, "#messages .message.user")
    assert [content(page, u) for u in users] == ["line one\nline two"]
    assert page.find_element(By.ID, "prompt").get_attribute("value") == ""
    bubble = wait(page).until(lambda d: assistants(d)[0] if assistants(d) else False)
    seen: list[int] = []  # lengths of the text while the answer streams
    while snap := page.execute_script(SNAPSHOT, bubble):
        assert snap["stop"] and not snap["send"], "Stop replaces Send while an answer streams"
        seen.append(snap["length"])
        time.sleep(0.05)
    first = content(page, finished(page))
    assert len({n for n in seen if n}) >= 2, f"the text never grew while streaming: {seen}"
    assert max(seen) <= len(first) and first.strip()
    assert bubble.get_attribute("data-finish") == "length"  # EOS is ignored: it ran to max_tokens
    assert page.find_element(By.ID, "status").text == "ready"
    assert page.find_element(By.ID, "send").is_enabled() and not page.find_element(By.ID, "stop").is_displayed()
    assert bubble.find_elements(By.CSS_SELECTOR, ".thumb-up") and bubble.find_elements(By.CSS_SELECTOR, ".thumb-down")
    [request] = chat_requests(page)
    assert request == {"model": "tiny", "messages": [{"role": "user", "content": "line one\nline two"}],
                       "temperature": 0.2, "stream": True}

    server.delay = 0.0
    ask(page, "and then?")  # the second turn sends the whole conversation, the first answer included
    finished(page)
    assert len(assistants(page)) == 2
    assert chat_requests(page)[1]["messages"] == [
        {"role": "user", "content": "line one\nline two"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "and then?"}]

    page.find_element(By.ID, "new-chat").click()
    assert page.find_elements(By.CSS_SELECTOR, "#messages .message") == []
    assert page.find_element(By.ID, "empty").is_displayed()
    assert not page.find_element(By.ID, "regenerate").is_enabled()
    ask(page, "fresh")
    finished(page)
    assert chat_requests(page)[2]["messages"] == [{"role": "user", "content": "fresh"}]


def test_stop_keeps_the_partial_answer_and_the_server_aborts(page: WebDriver, server: Server) -> None:
    server.delay = 0.3  # 40 tokens would take 12 s
    jobs = len(server.submitted)
    ask(page, "tell me a long story")
    bubble = wait(page).until(lambda d: assistants(d) and content(d, assistants(d)[0]) and assistants(d)[0])
    assert server.get("/health")["running"] == 1
    page.find_element(By.ID, "stop").click()
    stopped = time.monotonic()
    wait(page, 3).until(lambda d: bubble.get_attribute("data-finish") == "stopped")
    partial = content(page, bubble)
    assert partial and "streaming" not in bubble.get_attribute("class")
    assert not page.find_element(By.ID, "stop").is_displayed() and page.find_element(By.ID, "send").is_enabled()
    assert page.find_element(By.ID, "status").text == "stopped"
    assert bubble.find_element(By.CSS_SELECTOR, ".note").text == "stopped"
    wait(page, 3).until(lambda d: server.get("/health")["running"] == 0)
    assert time.monotonic() - stopped < 4  # well before the 12 s the answer would have run
    assert server.aborted and server.aborted[-1] is server.submitted[jobs]  # the page's request, aborted
    time.sleep(0.8)  # nothing more arrives: the partial answer stays as it was
    assert content(page, bubble) == partial
    assert page.find_element(By.ID, "regenerate").is_enabled()


def test_thumbs_write_the_feedback_file(page: WebDriver, server: Server) -> None:
    ask(page, "hello there")
    bubble = finished(page)
    answer = content(page, bubble)
    before = len(server.ratings())
    up, down = bubble.find_element(By.CSS_SELECTOR, ".thumb-up"), bubble.find_element(By.CSS_SELECTOR, ".thumb-down")
    up.click()
    wait(page, 5).until(lambda d: "selected" in up.get_attribute("class"))
    assert up.get_attribute("aria-pressed") == "true" and "selected" not in down.get_attribute("class")
    assert "saved" in bubble.find_element(By.CSS_SELECTOR, ".note").text
    [row] = server.ratings()[before:]
    assert row["rating"] == 1 and row["response"] == answer and row["model"] == "tiny"
    assert row["messages"] == [{"role": "user", "content": "hello there"}]  # the conversation before the answer
    down.click()  # changing one's mind files a second line
    wait(page, 5).until(lambda d: "selected" in down.get_attribute("class"))
    assert "selected" not in up.get_attribute("class")
    assert [r["rating"] for r in server.ratings()[before:]] == [1, -1]


def test_regenerate_replaces_the_last_answer(page: WebDriver, server: Server) -> None:
    ask(page, "first question")
    first = content(page, finished(page))
    ask(page, "second question")
    old = content(page, finished(page))
    jobs = len(server.submitted)
    page.find_element(By.ID, "regenerate").click()
    wait(page, 5).until(lambda d: len(chat_requests(d)) == 3)
    bubble = finished(page)
    new = content(page, bubble)
    assert len(server.submitted) == jobs + 1
    assert len(assistants(page)) == 2 and len(page.find_elements(By.CSS_SELECTOR, "#messages .message.user")) == 2
    requests = chat_requests(page)
    assert requests[2] == requests[1]  # the same conversation again, without the answer it replaces
    assert requests[2]["messages"][-1] == {"role": "user", "content": "second question"}
    assert new and new != old  # 40 sampled bytes: a new draw
    assert content(page, assistants(page)[0]) == first
    bubble.find_element(By.CSS_SELECTOR, ".thumb-up").click()  # feedback is filed with the new answer
    wait(page, 5).until(lambda d: server.ratings() and server.ratings()[-1]["response"] == new)
    assert server.ratings()[-1]["messages"] == requests[2]["messages"]


def test_system_prompt_and_temperature_are_sent(page: WebDriver, server: Server) -> None:
    page.find_element(By.ID, "system").send_keys("You are terse.")
    slider = page.find_element(By.ID, "temperature")
    page.execute_script("arguments[0].value = '0.7'; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert page.find_element(By.ID, "temperature-value").text == "0.7"
    ask(page, "hi")
    bubble = finished(page)
    [request] = chat_requests(page)
    assert request["temperature"] == 0.7
    down = bubble.find_element(By.CSS_SELECTOR, ".thumb-down")
    down.click()
    wait(page, 5).until(lambda d: "selected" in down.get_attribute("class"))
    row = server.ratings()[-1]
    assert row["rating"] == -1 and row["response"] == content(page, bubble)
    assert row["messages"] == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]


def test_errors_are_shown_in_the_page(page: WebDriver) -> None:
    box = page.find_element(By.ID, "prompt")
    page.execute_script("arguments[0].value = 'x'.repeat(600)", box)  # over the 512-token context: a 400
    box.send_keys(Keys.ENTER)
    bubble = finished(page)
    assert bubble.get_attribute("data-finish") == "error"
    note = bubble.find_element(By.CSS_SELECTOR, ".note").text
    assert note.startswith("error: context overflow") and "512" in note
    assert page.find_element(By.ID, "status").text.startswith("error: context overflow")
    assert not bubble.find_elements(By.CSS_SELECTOR, ".thumb-up")
    page.find_element(By.ID, "new-chat").click()
    ask(page, "short")  # the failed turn does not poison the next conversation
    assert content(page, finished(page))


def test_api_key_is_asked_for_stored_and_sent(page: WebDriver, server: Server) -> None:
    options = server.app.state.served.options
    options.api_keys = ["sesame"]
    try:
        page.get(server.url + "/")
        row = wait(page, 5).until(lambda d: d.find_element(By.ID, "api-key-row").is_displayed()
                                  and d.find_element(By.ID, "api-key-row"))
        assert page.find_element(By.ID, "status").text == "API key needed"
        page.find_element(By.ID, "api-key").send_keys("sesame")
        page.find_element(By.ID, "save-key").click()
        wait(page, 5).until(lambda d: not row.is_displayed() and d.find_element(By.ID, "status").text == "ready")
        assert page.execute_script("return localStorage.getItem('lmforge.apiKey')") == "sesame"
        assert page.find_element(By.ID, "model").text.startswith("tiny")
        ask(page, "hi")  # a 401 would show as an error: the key went along as Bearer
        bubble = finished(page)
        assert bubble.get_attribute("data-finish") == "length" and content(page, bubble)
        page.refresh()  # remembered: no key prompt the next time
        wait(page, 5).until(lambda d: d.find_element(By.ID, "status").text == "ready")
        assert not page.find_element(By.ID, "api-key-row").is_displayed()
    finally:
        options.api_keys = []
        page.execute_script("localStorage.clear()")



# ---- RAG: a server with a document store ------------------------------------------------------------------

QUESTION = "When is the Zorblax festival?"


def classes(element: WebElement) -> list[str]:
    return (element.get_attribute("class") or "").split()


def cited(bubble: WebElement) -> list[str]:
    items = bubble.find_elements(By.CSS_SELECTOR, ".source")
    return [i.get_attribute("data-n") for i in items if "cited" in classes(i)]


def parts(driver: WebDriver, item: WebElement) -> tuple[str, ...]:
    return tuple(text(driver, item.find_element(By.CSS_SELECTOR, f".source-{part}")) for part in ("n", "title", "file"))


def test_rag_toggle_is_offered_only_by_a_server_with_a_store(page: WebDriver, server: Server,
                                                              rag_server: Server) -> None:
    assert server.get("/health")["rag"] is False
    assert not page.find_element(By.ID, "rag-field").is_displayed()
    assert rag_server.get("/health")["rag"] is True
    page.get(rag_server.url + "/")
    wait(page).until(lambda d: d.find_element(By.ID, "status").text == "ready")
    field, toggle = page.find_element(By.ID, "rag-field"), page.find_element(By.ID, "rag")
    assert field.is_displayed() and field.text == "Answer from documents" and not toggle.is_selected()
    field.click()  # the label toggles it
    assert toggle.is_selected()
    assert page.find_element(By.ID, "prompt").get_attribute("placeholder") == "Ask the indexed documents…"


def test_rag_answer_shows_its_sources_and_regenerate_keeps_rag(rag_page: WebDriver, rag_server: Server,
                                                               rag_store: Path) -> None:
    from lmforge.rag.answer import citations

    toggle = rag_page.find_element(By.ID, "rag")
    toggle.click()
    ask(rag_page, QUESTION)
    bubble = finished(rag_page)
    [request] = chat_requests(rag_page)
    assert request["rag"] is True and request["messages"] == [{"role": "user", "content": QUESTION}]
    items = bubble.find_elements(By.CSS_SELECTOR, ".extras .sources .source")
    assert len(items) == 2  # both files' single chunks; the festival first
    assert [parts(rag_page, i) for i in items] == [("[1]", "The Zorblax festival", "festival.md"),
                                                   ("[2]", "Tomatoes", "garden.md")]
    summary = items[0].find_element(By.TAG_NAME, "summary")
    assert summary.get_attribute("title").startswith(str(rag_store.parent / "docs" / "festival.md") + ", characters")
    chunk = items[0].find_element(By.CSS_SELECTOR, ".source-text")
    assert not chunk.is_displayed()
    summary.click()  # the chunk's text, on click
    wait(rag_page, 3).until(lambda d: chunk.is_displayed())
    assert "The Zorblax festival is held every March in Quibbleton." in chunk.text
    answer = content(rag_page, bubble)
    assert answer and bubble.get_attribute("data-finish") == "length"
    # the last chunk marked what the answer cites (random bytes: most likely nothing)
    assert "final" in classes(bubble.find_element(By.CSS_SELECTOR, ".sources"))
    assert cited(bubble) == [str(n) for n in sorted(citations(answer, 2))]
    head = bubble.find_element(By.CSS_SELECTOR, ".sources-head").text
    assert head == (f"Sources · {len(cited(bubble))} cited" if cited(bubble) else "Sources · none cited")

    bubble.find_element(By.CSS_SELECTOR, ".thumb-up").click()  # feedback: the conversation seen, not the sources
    wait(rag_page, 5).until(lambda d: rag_server.ratings() and rag_server.ratings()[-1]["response"] == answer)
    assert rag_server.ratings()[-1]["messages"] == [{"role": "user", "content": QUESTION}]

    toggle.click()  # off: Regenerate still asks the documents, as the answer it replaces did
    rag_page.find_element(By.ID, "regenerate").click()
    wait(rag_page, 5).until(lambda d: len(chat_requests(d)) == 2)
    bubble = finished(rag_page)
    assert chat_requests(rag_page)[1] == request
    assert [parts(rag_page, i) for i in bubble.find_elements(By.CSS_SELECTOR, ".source")][0][2] == "festival.md"
    assert not bubble.find_element(By.CSS_SELECTOR, ".source-text").is_displayed()  # a fresh list
    regenerated = content(rag_page, bubble)

    ask(rag_page, "and tomatoes?")  # the toggle is off now: a plain answer, no sources
    plain = finished(rag_page)
    third = chat_requests(rag_page)[2]
    assert "rag" not in third and third["messages"] == [
        {"role": "user", "content": QUESTION}, {"role": "assistant", "content": regenerated},
        {"role": "user", "content": "and tomatoes?"}]
    assert not plain.find_element(By.CSS_SELECTOR, ".extras").is_displayed()
    assert not plain.find_elements(By.CSS_SELECTOR, ".source, .sources-note")


def test_rag_with_nothing_relevant_says_so(rag_page: WebDriver, rag_server: Server, rag_store: Path) -> None:
    from lmforge.rag.answer import NOTHING, retrieve_sources
    from lmforge.rag.store import open_store

    question = "quantum chromodynamics lattice gauge"
    store = open_store(rag_store, create=False)
    try:  # the premise: no chunk reaches the default min_score (0.25) the page's `rag: true` gets
        assert retrieve_sources(question, store, 4) == []
    finally:
        store.close()
    jobs = len(rag_server.submitted)
    rag_page.find_element(By.ID, "rag").click()
    ask(rag_page, question)
    bubble = finished(rag_page)
    assert chat_requests(rag_page)[0]["rag"] is True
    assert content(rag_page, bubble) == NOTHING and bubble.get_attribute("data-finish") == "stop"
    note = bubble.find_element(By.CSS_SELECTOR, ".extras .sources-note")
    assert note.is_displayed() and note.text == "no matching documents"
    assert not bubble.find_elements(By.CSS_SELECTOR, ".source")
    assert len(rag_server.submitted) == jobs  # nothing was generated
    assert rag_page.find_element(By.ID, "status").text == "ready"


SCRIPTED_STREAM = """
const [opening, closing] = arguments;
let release;
const gate = new Promise((resolve) => { release = resolve; });
window.__release = () => release();
const recorded = window.fetch;
window.fetch = (url, options) => {
  if (!String(url).endsWith("/chat/completions")) return recorded(url, options);
  window.__requests.push({url: String(url), body: JSON.parse(options.body)});
  const encoder = new TextEncoder();
  const send = (controller, chunk) => controller.enqueue(encoder.encode(`data: ${JSON.stringify(chunk)}\\n\\n`));
  const body = new ReadableStream({
    async start(controller) {
      for (const chunk of opening) send(controller, chunk);
      await gate;
      for (const chunk of closing) send(controller, chunk);
      controller.enqueue(encoder.encode("data: [DONE]\\n\\n"));
      controller.close();
    },
  });
  return Promise.resolve(new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}}));
};
"""


def test_cited_sources_are_marked_when_the_answer_ends(rag_page: WebDriver) -> None:
    """The page's fetch answers with a scripted stream in the server's shape (protocol.Citation rows): the
    opening chunk lists three sources, none cited; the last one says the answer cites [1] and [3]."""
    from lmforge.serve.protocol import Citation

    def rows(marked: set[int]) -> list[dict[str, Any]]:
        sources = [("/srv/docs/festival.md", "The Zorblax festival", "Held every March in Quibbleton."),
                   ("/srv/docs/garden.md", "Tomatoes", "Full sun, <b>regular</b> watering."),
                   ("notes\\calendar.txt", "", "March: the festival.")]
        return [Citation(n=n, source=source, title=title, text=body, start=0, end=len(body), score=0.5 - n / 10,
                         cited=n in marked).model_dump() for n, (source, title, body) in enumerate(sources, 1)]

    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "tiny"}

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    opening = [{**head, "choices": choice({"role": "assistant", "content": ""}), "citations": rows(set())},
               {**head, "choices": choice({"content": "It is held in March [1][3]."})}]
    closing = [{**head, "choices": choice({}, "stop"), "citations": rows({1, 3})}]
    rag_page.execute_script(SCRIPTED_STREAM, opening, closing)
    rag_page.find_element(By.ID, "rag").click()
    ask(rag_page, QUESTION)
    bubble = wait(rag_page).until(lambda d: assistants(d) and assistants(d)[0].find_elements(By.CSS_SELECTOR, ".source")
                                  and assistants(d)[0])
    wait(rag_page, 3).until(lambda d: content(d, bubble) == "It is held in March [1][3].")
    items = bubble.find_elements(By.CSS_SELECTOR, ".source")
    assert "streaming" in classes(bubble) and cited(bubble) == []  # drawn from the opening chunk, nothing marked yet
    assert "final" not in classes(bubble.find_element(By.CSS_SELECTOR, ".sources"))
    assert bubble.find_element(By.CSS_SELECTOR, ".sources-head").text == "Sources"
    assert [parts(rag_page, i) for i in items] == [("[1]", "The Zorblax festival", "festival.md"),
                                                   ("[2]", "Tomatoes", "garden.md"),
                                                   ("[3]", "calendar.txt", "calendar.txt")]  # no title: the file
    items[0].find_element(By.TAG_NAME, "summary").click()  # opened while streaming ...
    style = "return getComputedStyle(arguments[0]).backgroundColor"
    plain = rag_page.execute_script(style, items[0])

    rag_page.execute_script("window.__release()")
    finished(rag_page)
    assert bubble.get_attribute("data-finish") == "stop"
    assert bubble.find_elements(By.CSS_SELECTOR, ".source") == items  # marked in place, not redrawn
    assert cited(bubble) == ["1", "3"]
    assert "final" in classes(bubble.find_element(By.CSS_SELECTOR, ".sources"))
    assert bubble.find_element(By.CSS_SELECTOR, ".sources-head").text == "Sources · 2 cited"
    assert items[0].find_element(By.CSS_SELECTOR, ".source-text").is_displayed()  # ... and still open
    highlighted = rag_page.execute_script(style, items[0])
    assert highlighted != plain and rag_page.execute_script(style, items[2]) == highlighted
    assert rag_page.execute_script(style, items[1]) == plain
    badge = "return getComputedStyle(arguments[0].querySelector('summary'), '::after').content"
    assert [rag_page.execute_script(badge, i) for i in items] == ['"cited"', "none", '"cited"']
    tomato = items[1].find_element(By.CSS_SELECTOR, ".source-text")
    assert text(rag_page, tomato) == "Full sun, <b>regular</b> watering." and not tomato.find_elements(By.TAG_NAME, "b")
