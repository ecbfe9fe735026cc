"""The command line: the typer app and its commands (app.py), and all rendering (render.py,
bounds.py, gate.py). Nothing outside this package prints or imports rich."""

from trm_diag.cli.app import app, main

__all__ = ["app", "main"]
