"""Errors that mean "the input is wrong", not "the program is": the jobs print them and exit 2."""
from __future__ import annotations


class DataError(ValueError):
    """An input file (a dataset source, shard, image or weights file) that cannot be used; the message
    names the file and what is wrong with it."""
