"""Console logging of the command line: Lightning's INFO lines are printed once, warnings still show."""

from __future__ import annotations

import logging

from theseus_transport.console import configure_console_logging


def test_root_handler_takes_warnings_only_and_keeps_openclip_from_adding_another(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh `theseus` process (pytest adds its own)
    configure_console_logging()
    (handler,) = root.handlers
    # Lightning prints its INFO records itself and passes them up: the root must not print them again
    info = logging.LogRecord("lightning.pytorch", logging.INFO, __file__, 1, "GPU available: False", None, None)
    warning = logging.LogRecord("theseus", logging.WARNING, __file__, 1, "something to see", None, None)
    assert handler.level == logging.WARNING and info.levelno < handler.level <= warning.levelno
    logging.info("OpenCLIP logs like this; with no root handler it would install a catch-all one")
    assert root.handlers == [handler]
    configure_console_logging()  # idempotent, and an application's own configuration is kept
    assert root.handlers == [handler]
