"""Logging set-up of every script and campaign: messages to stdout and, optionally, a log file."""

from __future__ import annotations

import logging
import os
import sys


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (it may be replaced after setup)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(logfile: str | None = None, level=logging.INFO) -> None:
    handlers = [_StdoutHandler()]
    if logfile:
        os.makedirs(os.path.dirname(os.path.abspath(logfile)), exist_ok=True)
        handlers.append(logging.FileHandler(logfile))
    logging.basicConfig(level=level, format="%(message)s", handlers=handlers, force=True)
