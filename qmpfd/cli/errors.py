"""The one error type of qmpfctl: a QMP error class, a sentence, and the exit status."""

from __future__ import annotations


class CliError(Exception):
    def __init__(self, error_class: str, desc: str, status: int = 1) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc
        self.status = status
