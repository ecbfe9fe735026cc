"""The command line: the typer app (app.py), one module per command (commands/), the shared options
(options.py) and consoles (console.py), the entry point (entry.py), and all rendering (render.py,
bounds.py, gate.py, locate.py, sweep.py). Nothing outside this package prints or imports rich."""

from trm_diag.cli.app import app
from trm_diag.cli.entry import main

__all__ = ["app", "main"]
