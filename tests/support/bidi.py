"""A small WebDriver BiDi client: Firefox driven over its own WebSocket, for the page tests.

Firefox speaks WebDriver BiDi itself (no geckodriver, no Playwright build of Firefox):
started with ``--remote-debugging-port`` it prints ``WebDriver BiDi listening on
ws://HOST:PORT`` on stderr and takes a session at ``ws://HOST:PORT/session``. ``launch``
starts it headless on a fresh profile in a temporary folder (port 0: the system picks a
free one), opens a session and yields a :class:`Firefox`; leaving the ``with`` block closes
the browser (``browser.close``), kills it if it does not exit, and removes the profile,
also when the test failed.

Only what the page tests use: tabs, each in its own user context (``browsingContext``),
script evaluation with the results as Python values (``script``), real input through
``input.performActions`` (key presses and pointer clicks: the page gets trusted events,
not calls into its code), file inputs (``input.setFiles``), and the log
(``log.entryAdded``: console messages, uncaught errors, and what the page's
Content-Security-Policy blocked, which Firefox reports as errors). Every wait is bounded
and its timeout says what it waited for.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support import announce

LISTENING = re.compile(r"WebDriver BiDi listening on (ws://\S+)")
#: WebDriver's codes for the keys the tests press (the WebDriver spec's keyboard table)
KEYS = {"Enter": "\ue007", "Escape": "\ue00c", "Tab": "\ue004", "Backspace": "\ue003",
        "ArrowLeft": "\ue012", "ArrowUp": "\ue013", "ArrowRight": "\ue014",
        "ArrowDown": "\ue015"}
#: Polls a predicate inside the page (no round trip a poll); PREDICATE is put in as text,
#: so it is compiled by the BiDi agent, not by the page's eval (which its CSP forbids).
WAIT_FOR = """async (ms) => {
  const end = performance.now() + ms;
  for (;;) {
    let value = null;
    try { value = await (PREDICATE); } catch (e) { value = null; }
    if (value) return {value};
    if (performance.now() > end) return null;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}"""
#: The element matching a selector if it is laid out and not hidden, else null.
VISIBLE = """(s) => {
  const e = document.querySelector(s);
  if (!e || e.closest("[hidden]")) return null;
  const r = e.getBoundingClientRect();
  return r.width > 0 && r.height > 0 && getComputedStyle(e).visibility !== "hidden" ? e : null;
}"""


class BidiError(RuntimeError):
    """An error answer to a command, no answer in time, or a browser that went away."""


class BidiTimeout(BidiError):
    """Nothing arrived within the wait."""


class Firefox:
    """A WebDriver BiDi session with a running Firefox (made by :func:`launch`)."""

    def __init__(self, proc: subprocess.Popen, ws, lines: list[str]) -> None:
        self.proc, self.ws, self.lines = proc, ws, lines
        self.ids = itertools.count(1)
        #: every ``log.entryAdded`` event's params, in order
        self.log: list[dict] = []
        self.closed = False

    def _gone(self, what: str, e: Exception) -> BidiError:
        return BidiError(f"{what}: {type(e).__name__}: {e} (Firefox exit {self.proc.poll()}; "
                         f"stderr: {''.join(self.lines)[-2000:]})")

    def _receive(self, end: float, what: str) -> dict:
        """The next message before ``end`` (``time.monotonic()``); a log event is kept."""
        import websocket

        left = end - time.monotonic()
        if left <= 0:
            raise BidiTimeout(what)
        try:
            self.ws.settimeout(left)
            msg = json.loads(self.ws.recv())
        except websocket.WebSocketTimeoutException:
            raise BidiTimeout(what) from None
        except (websocket.WebSocketException, OSError, ValueError) as e:
            raise self._gone(what, e) from None
        if msg.get("type") == "event" and msg.get("method") == "log.entryAdded":
            self.log.append(msg["params"])
        return msg

    def command(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        """Send one command and return its result; events that arrive meanwhile are kept.

        Raises:
            BidiError: an error answer, no answer within ``timeout`` seconds
                (:class:`BidiTimeout`), or the connection closed.
        """
        import websocket

        cid = next(self.ids)
        end = time.monotonic() + timeout
        try:
            self.ws.send(json.dumps({"id": cid, "method": method, "params": params or {}}))
        except (websocket.WebSocketException, OSError) as e:
            raise self._gone(method, e) from None
        while True:
            msg = self._receive(end, f"{method}: no answer within {timeout:.0f} s")
            if msg.get("type") == "event" or msg.get("id") != cid:
                continue  # an event, or the late answer to a command that timed out
            if msg.get("type") == "error":
                raise BidiError(f"{method}: {msg.get('error')}: {msg.get('message')}")
            return msg.get("result", {})

    def wait_for_log(self, match, timeout: float = 60, what: str = "log entry") -> dict:
        """The first ``log.entryAdded`` params for which ``match(params)`` is true, reading
        the events that arrive for up to ``timeout`` seconds.

        Raises:
            AssertionError: none within ``timeout``.
        """
        end = time.monotonic() + timeout
        seen = 0
        while True:
            for entry in self.log[seen:]:
                if match(entry):
                    return entry
            seen = len(self.log)
            try:
                self._receive(end, what)
            except BidiTimeout:
                raise AssertionError(f"no {what} within {timeout:.0f} s: {self.log}") from None

    def new_tab(self, width: int = 1200, height: int = 800) -> "Tab":
        """A tab of ``width`` x ``height`` CSS pixels in a user context of its own (its own
        cookies and storage, as a Playwright browser context)."""
        user = self.command("browser.createUserContext")["userContext"]
        context = self.command("browsingContext.create",
                               {"type": "tab", "userContext": user})["context"]
        self.command("browsingContext.setViewport",
                     {"context": context, "viewport": {"width": width, "height": height}})
        return Tab(self, context, user)

    def close(self, timeout: float = 20) -> None:
        """``browser.close`` (the process exits by itself); safe to call twice."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(BidiError):
            self.command("browser.close", timeout=timeout)
        with contextlib.suppress(Exception):
            self.ws.close()


class Tab:
    """One browsing context: navigation, script, real input, and its log."""

    def __init__(self, browser: Firefox, context: str, user_context: str) -> None:
        self.browser, self.context, self.user_context = browser, context, user_context

    # -- script --------------------------------------------------------------------------------

    def _result(self, answer: dict, what: str) -> Any:
        if answer.get("type") == "exception":
            details = answer.get("exceptionDetails", {})
            raise BidiError(f"{what[:200]}: {details.get('text')}")
        return python_value(answer.get("result", {"type": "undefined"}))

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        answer = self.browser.command("script.evaluate", {
            "expression": expression, "target": {"context": self.context},
            "awaitPromise": True}, timeout=timeout)
        return self._result(answer, expression)

    def call(self, function: str, *args: Any, timeout: float = 60) -> Any:
        """``function(*args)`` in the page: ``function`` is a JavaScript function's source;
        ``args`` are JSON-like values or nodes this tab returned (a promise is awaited)."""
        answer = self.browser.command("script.callFunction", {
            "functionDeclaration": function, "arguments": [local_value(a) for a in args],
            "target": {"context": self.context}, "awaitPromise": True}, timeout=timeout)
        return self._result(answer, function)

    def wait_for(self, predicate: str, timeout: float = 60, what: str | None = None) -> Any:
        """Wait until the JavaScript expression ``predicate`` is truthy (an exception counts
        as false), polled in the page every 50 ms; returns its value.

        Raises:
            AssertionError: still false after ``timeout`` seconds; says ``what`` (else the
                predicate).
        """
        found = self.call(WAIT_FOR.replace("PREDICATE", predicate), timeout * 1000,
                          timeout=timeout + 30)
        if found is None:
            raise AssertionError(f"still false after {timeout:.0f} s: {what or predicate}")
        return found["value"]

    def text(self, selector: str) -> str | None:
        """The text of the first element matching ``selector`` (None: no such element)."""
        return self.call("(s) => { const e = document.querySelector(s); "
                         "return e ? e.textContent : null; }", selector)

    @property
    def url(self) -> str:
        return self.evaluate("location.href")

    # -- navigation ----------------------------------------------------------------------------

    def navigate(self, url: str, timeout: float = 60) -> None:
        """Load ``url`` and wait for its load event."""
        self.browser.command("browsingContext.navigate", {
            "context": self.context, "url": url, "wait": "complete"}, timeout=timeout)

    def back(self) -> None:
        """The back button (``browsingContext.traverseHistory``, delta -1)."""
        self.browser.command("browsingContext.traverseHistory",
                             {"context": self.context, "delta": -1})

    # -- input ---------------------------------------------------------------------------------

    def _perform(self, actions: list[dict]) -> None:
        self.browser.command("input.performActions",
                             {"context": self.context, "actions": actions})

    def type(self, text: str) -> None:
        """Type ``text`` into the focused element, one key press a character."""
        keys = []
        for ch in text:
            keys += [{"type": "keyDown", "value": ch}, {"type": "keyUp", "value": ch}]
        self._perform([{"type": "key", "id": "keyboard", "actions": keys}])

    def press(self, key: str) -> None:
        """Press and release one key: a character, or a name in :data:`KEYS`."""
        value = KEYS.get(key, key)
        self._perform([{"type": "key", "id": "keyboard", "actions": [
            {"type": "keyDown", "value": value}, {"type": "keyUp", "value": value}]}])

    def element(self, selector: str, timeout: float = 60) -> dict:
        """The first element matching ``selector`` once it is visible, scrolled into view
        (a node reference for :meth:`call`, :meth:`click_node` and :meth:`set_files`)."""
        node = self.wait_for(f"({VISIBLE})({json.dumps(selector)})", timeout,
                             what=f"{selector} visible")
        self.call("(e) => e.scrollIntoView({block: 'center', inline: 'center'})", node)
        return node

    def click(self, selector: str, timeout: float = 60) -> None:
        """A left click with the mouse at the centre of ``selector`` once it is visible."""
        self.click_node(self.element(selector, timeout))

    def click_node(self, node: dict) -> None:
        origin = {"type": "element", "element": {"sharedId": node["sharedId"]}}
        self._perform([{"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
                        "actions": [{"type": "pointerMove", "x": 0, "y": 0, "origin": origin},
                                    {"type": "pointerDown", "button": 0},
                                    {"type": "pointerUp", "button": 0}]}])

    def set_files(self, selector: str, paths: list[str | os.PathLike]) -> None:
        """Choose ``paths`` in the file input ``selector`` (its change event fires)."""
        node = self.call("(s) => document.querySelector(s)", selector)
        if node is None:
            raise BidiError(f"no element {selector}")
        self.browser.command("input.setFiles", {
            "context": self.context, "element": {"sharedId": node["sharedId"]},
            "files": [str(p) for p in paths]})

    # -- the log -------------------------------------------------------------------------------

    def entries(self) -> list[dict]:
        """This tab's ``log.entryAdded`` params so far."""
        return [e for e in self.browser.log
                if e.get("source", {}).get("context") == self.context]

    def problems(self) -> list[str]:
        """This tab's console errors and uncaught exceptions, as lines."""
        return [f"{e.get('type')} {e.get('level')}: {e.get('text')}"
                for e in self.entries() if e.get("level") == "error"]

    def close(self) -> None:
        with contextlib.suppress(BidiError):
            self.browser.command("browsingContext.close", {"context": self.context})
            self.browser.command("browser.removeUserContext", {"userContext": self.user_context})


def python_value(v: dict) -> Any:
    """A BiDi RemoteValue as Python: primitives, lists and dicts; nodes and other objects
    stay the RemoteValue dict (with its ``sharedId`` or ``handle``)."""
    t = v.get("type")
    if t in ("undefined", "null"):
        return None
    if t in ("string", "boolean"):
        return v["value"]
    if t == "number":
        x = v["value"]
        return float(x) if isinstance(x, str) else x  # "NaN", "Infinity", "-0"
    if t == "bigint":
        return int(v["value"])
    if t in ("array", "set") and "value" in v:
        return [python_value(x) for x in v["value"]]
    if t in ("object", "map") and "value" in v:
        return {(k if isinstance(k, str) else json.dumps(python_value(k))): python_value(x)
                for k, x in v["value"]}
    return v


def local_value(x: Any) -> dict:
    """A Python value (or a node this client returned) as a BiDi LocalValue."""
    if isinstance(x, dict) and "sharedId" in x:
        return {"sharedId": x["sharedId"]}
    if x is None:
        return {"type": "null"}
    if isinstance(x, bool):
        return {"type": "boolean", "value": x}
    if isinstance(x, (int, float)):
        return {"type": "number", "value": x}
    if isinstance(x, str):
        return {"type": "string", "value": x}
    if isinstance(x, (list, tuple)):
        return {"type": "array", "value": [local_value(a) for a in x]}
    if isinstance(x, dict):
        return {"type": "object", "value": [[str(k), local_value(a)] for k, a in x.items()]}
    raise TypeError(f"cannot pass {type(x).__name__} to the page")


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    """Wait for ``proc`` to exit; past ``timeout`` kill its process group (Firefox and the
    content processes it started)."""
    try:
        proc.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    if hasattr(os, "killpg"):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()
    proc.wait(10)


@contextlib.contextmanager
def launch(exe: str, timeout: float = 60) -> Iterator[Firefox]:
    """Start Firefox ``exe`` headless on a fresh profile and open a BiDi session.

    Firefox applies its own recommended automation preferences when its remote agent is on
    (``remote.prefs.recommended``: no updates, telemetry or first-run pages).

    Raises:
        BidiError: it exited, or printed no WebDriver BiDi address within ``timeout``
            seconds, or refused the session.
    """
    import websocket

    root = Path(tempfile.mkdtemp(prefix="itr-firefox-"))
    profile = root / "profile"
    profile.mkdir()
    env = {**os.environ, "HOME": str(root / "home"), "MOZ_CRASHREPORTER_DISABLE": "1"}
    cmd = [exe, "--headless", "--no-remote", "--profile", str(profile),
           "--remote-debugging-port=0", "about:blank"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=hasattr(os, "killpg"))
    browser = None
    try:
        url, lines = announce.watch(proc, LISTENING, timeout)
        if url is None:
            said = "exited" if proc.poll() is not None else f"is silent after {timeout:.0f} s"
            raise BidiError(f"{exe} {said} without a WebDriver BiDi address (exit "
                            f"{proc.poll()}): {''.join(lines)[-2000:]}")
        # Firefox refuses a WebSocket handshake that carries an Origin header
        ws = websocket.create_connection(url + "/session", timeout=timeout,
                                         suppress_origin=True)
        browser = Firefox(proc, ws, lines)
        browser.command("session.new", {"capabilities": {}}, timeout=timeout)
        browser.command("session.subscribe", {"events": ["log.entryAdded"]})
        yield browser
    finally:
        if browser is not None:
            browser.close()
        _stop(proc, 30 if browser is not None else 0)  # no session: nothing to wait for
        shutil.rmtree(root, ignore_errors=True)
