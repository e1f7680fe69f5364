"""The ``hpcddf`` command line: parse arguments, call one function, print. No logic here.

One module per command group; importing them registers their commands on the group."""

from hpcddf.cli import demo, fields, mosaics, node, phangs, survey  # noqa: F401  (registers the commands)
from hpcddf.cli.app import cli, main

__all__ = ["cli", "main"]
