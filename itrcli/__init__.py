"""itr: search a local photo collection by meaning.

The Python API is :class:`itrcli.Library` (the CLI is a thin layer over it)::

    from itrcli import Library
    with Library.open("~/.local/share/itr", create=True) as lib:
        lib.index(["~/photos"])
        for hit in lib.search("a dog on a beach", top=5):
            print(f"{hit.score:.4f}  {hit.path}")
"""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["Library", "SearchRequest", "SearchResult", "ExitCode", "ItrError", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import itrcli` (and `itr --help`) stays instant.
    if name == "Library":
        from .library import Library

        return Library
    if name in ("SearchRequest", "SearchResult"):
        from .query import request

        return getattr(request, name)
    if name in ("ExitCode", "ItrError"):
        from . import errors

        return getattr(errors, name)
    raise AttributeError(name)
