"""Command-line wiring only: each command is a thin wrapper over a library function.

Typer is imported in cli/ and nowhere else, and only through its public API. Library errors
(SurgeonError) become one red line on stderr and exit code 1 (failure) or 2 (usage); plugins add
commands through the entry-point group `surgeon.commands` (each entry point is a function
`register(app)` that adds commands to the Typer app).
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points

from surgeon.cli import early

PLUGIN_GROUP = "surgeon.commands"


def build_app():
    # PEFT imports bitsandbytes when it is installed, whose CPU backend logs a warning about an optional kernel
    # download at import: not the user's concern on a command line that prints one line per problem
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from surgeon.cli.commands import app
    from surgeon.cli.common import err_console

    if not getattr(app, "_surgeon_plugins_loaded", False):
        for ep in entry_points(group=PLUGIN_GROUP):
            try:
                ep.load()(app)
            except Exception as e:  # a broken plugin must not take the core commands down
                err_console().print(f"[yellow]warning:[/] plugin {ep.name!r} failed to load: {e}")
        app._surgeon_plugins_loaded = True
    return app


def run() -> None:
    early.start(sys.argv[1:])  # split with SURGEON_EARLY_READ=N: the model starts coming off the disk before torch loads
    try:
        build_app()(prog_name="surgeon")
    finally:
        early.stop()
