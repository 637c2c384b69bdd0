"""The `rkmqtt` command: parser and dispatch in `main.py`, one module per command."""

from rkmqtt.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
