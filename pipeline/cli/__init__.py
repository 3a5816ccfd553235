"""The `pipeline` command: `run`, `submit`, `report`, `runs`, `demo` (commands.py)."""

from pipeline.cli.commands import build_parser, entry, main

__all__ = ["build_parser", "entry", "main"]
