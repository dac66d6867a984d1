"""Command-line wiring only: each command is a thin wrapper over a library function.

Typer is imported in cli/ and nowhere else, and only through its public API. Library errors
(SurgeonError) become one red line on stderr and exit code 1 (failure) or 2 (usage); plugins add
commands through the entry-point group `surgeon.commands` (each entry point is a function
`register(app)` that adds commands to the Typer app).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
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
    except SystemExit as e:
        early.stop()
        leave(e.code)
        raise
    finally:
        early.stop()


def leave(code) -> None:
    """End the process now that the command has returned: its files are written, fsynced and renamed
    and its locks released, so the interpreter's teardown of torch, transformers and PEFT (1.7 s on
    the CPU machine, bench/RESULTS.md) does nothing a user needs. atexit handlers still run and the
    streams are flushed; a worker thread still alive, a stream that fails to flush (a full disk: the
    ordinary exit reports it and exits 120) or an exit code that is not a number leaves the ordinary
    way. SURGEON_SLOW_EXIT=1 always does."""
    if not (code is None or isinstance(code, int)) or os.environ.get("SURGEON_SLOW_EXIT") == "1":
        return
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()  # noqa: SLF001  (the documented hooks, run as a normal exit would)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001  (a full disk, a closed pipe: the interpreter's own exit reports it and fails)
            return
    os._exit(code or 0)
