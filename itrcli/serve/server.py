"""Running ``itr serve``: bind, print the URL on stderr, serve with uvicorn until Ctrl-C or
SIGTERM, then stop the watcher and end cleanly (exit 0)."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from typing import Callable

from ..errors import LibraryError
from .app import ServeOptions, create_app
from .security import check_bind


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one).
    Raises:
        LibraryError: the address cannot be bound (in use, not this machine's).
    """
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise LibraryError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        hint = "; another itr serve? pick another --port" if e.errno in (98, 48) else ""
        raise LibraryError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, ending on Ctrl-C or SIGTERM without raising the signal again
        (uvicorn re-raises it after shutting down: the process would end with 130/143);
        ``on_exit``, if set, is called at the signal (to cut short a start-up)."""

        on_exit: Callable[[], None] | None = None

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            if self.on_exit is not None:
                self.on_exit()

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return Server


def serve(options: ServeOptions, *, watch=None, open_browser: bool = False,
          say: Callable[[str], None] | None = None) -> None:
    """Serve the library until Ctrl-C or SIGTERM.

    ``watch``: a :class:`~itrcli.serve.watch.WatchOptions` to keep the library current.
    ``say``: where the URL and the server's lines go (default: stderr).
    Raises:
        UsageError: a non-loopback ``host`` without a token.
        LibraryError: no library there (and no ``watch`` to make one), the port is taken.
    """
    import uvicorn

    from .live import LiveLibrary
    from .watch import Watcher

    say = say or (lambda line: (sys.stderr.write(line + "\n"), sys.stderr.flush()))
    check_bind(options.host, options.token)
    if watch is None:  # nothing would ever make one: say so now, not at each request
        from ..library import Library

        Library.open(options.directory, readonly=True).close()
    sock = bind(options.host, options.port)
    options.port = sock.getsockname()[1]
    watcher = Watcher(options.directory, watch) if watch is not None else None
    options.watcher = watcher
    live = LiveLibrary(options.directory, options.text_precision)
    app = create_app(options, live)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            server_header=False, proxy_headers=False,
                            timeout_graceful_shutdown=5, timeout_keep_alive=5)
    server = _server_class()(config)
    server.on_exit = live.interrupt
    url = url_of(options.host, options.port)
    shown = url + (f"?token={options.token}" if options.token else "")

    def announce():
        # after startup (the library and its text tower loaded): the URL is ready to open
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started and not server.should_exit:  # not when told to stop meanwhile
            say(f"itr serve: {shown}  (library {options.directory}; Ctrl-C to stop)")
            if open_browser:
                import webbrowser

                webbrowser.open(shown)

    if watcher is not None:
        watcher.start()
    threading.Thread(target=announce, daemon=True, name="itr-announce").start()
    try:
        server.run(sockets=[sock])
    finally:
        if watcher is not None:
            watcher.stop()
        sock.close()
    say("itr serve: stopped")


__all__ = ["bind", "serve", "url_of"]
