"""Errors that mean "the input is wrong", not "the program is": the jobs print them and exit 2."""
from __future__ import annotations


class DataError(ValueError):
    """An input file (a dataset source, shard, image or weights file) that cannot be used; the message
    names the file and what is wrong with it."""


class ClusterError(RuntimeError):
    """The Ray cluster cannot run what the config asks for (node-local paths on several nodes, resources
    no node offers); the message names the request and what the cluster has."""


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message says what is allowed."""
