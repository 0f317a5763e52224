"""The `ferry` command (console script `ferry = "ferry_client.cli:main"`); docs/cli.md describes it."""

from ferry_client.cli.main import main

__all__ = ["main"]
