"""``itr serve``: a warm local server over one library, and the web page it serves.

- :mod:`.params`    an HTTP query string -> a :class:`~itrcli.query.request.SearchRequest`
  (the command line's option names), and the paging tokens; no web framework imported
- :mod:`.live`      the read-only library on its own thread: reopened when the database
  file is swapped, each request on one read snapshot
- :mod:`.security`  binding rules, token, Host check, cross-site refusal, CORS, headers
- :mod:`.app`       the Starlette application: ``/api/...``, clip-retrieval's ``clip back``
  routes (:mod:`.clipback`), the page under ``static/``
- :mod:`.watch`     ``--watch``: the library's own index run on file events, or rescans
- :mod:`.server`    uvicorn, the URL on stderr, a clean exit on Ctrl-C or SIGTERM

Nothing here is imported by ``itr --help`` or ``itr search``; only :mod:`itrcli.cli`
imports this package.  The API is described in ``docs/serve.md``.
"""
