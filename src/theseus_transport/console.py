"""Console logging for the command line and its worker processes: each record printed once."""

from __future__ import annotations

import logging


def configure_console_logging() -> None:
    """Give the root logger one stderr handler at WARNING, unless the application configured it already.

    OpenCLIP logs through `logging.info(...)`, which installs a catch-all root handler on first use;
    Lightning prints its INFO records with a handler of its own and also passes them up to the root,
    so every Lightning line then appeared twice. A root handler that only takes warnings keeps
    Lightning's lines single and still shows every library's warnings.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s: %(message)s"))
    root.addHandler(handler)
