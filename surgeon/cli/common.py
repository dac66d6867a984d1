"""What every command shares: the error map, the rich progress bar, options used more than once."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from surgeon.engine.distributed import is_main_process, linger
from surgeon.engine.progress import NullReporter, Reporter
from surgeon.errors import SurgeonError


def err_console() -> Console:
    return Console(stderr=True, highlight=False)


@contextlib.contextmanager
def errors_to_exit():
    """SurgeonError -> one line on stderr + exit code; Ctrl-C -> a note that the run can resume."""
    try:
        yield
    except SurgeonError as e:
        if getattr(e, "reported", False) and not is_main_process():  # under torchrun rank 0 prints it
            linger()
        else:
            err_console().print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except OSError as e:  # the file system refused (permissions, read-only, I/O error): one line, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        err_console().print(f"[bold red]error:[/] {escape(e.strerror or str(e))}{escape(where)}; fix that and run the same command again.", soft_wrap=True)
        raise typer.Exit(1) from None
    except RecursionError:  # json's parser on a hostile file nested thousands deep, where no reader names it
        err_console().print("[bold red]error:[/] an input file is nested too deeply to read (a damaged or hostile JSON file); "
                            "check the JSON files of the folders this command reads.", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        if is_main_process():  # torchrun hands Ctrl-C to every rank: one note is enough
            err_console().print("[yellow]interrupted[/]: the partial output is kept; run the same command again to resume.")
        raise typer.Exit(130) from None


class RichReporter(Reporter):
    """Tensors done, GB/s and ETA on stderr."""

    def __init__(self, label: str):
        self.label = label
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[tensors]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console(),
            transient=False,
        )
        self.task = None
        self.count = 0
        self.total_tensors = 0
        self.t0 = 0.0
        self.nbytes = 0

    def start(self, total_tensors, total_bytes, done=0):
        self.total_tensors, self.count, self.t0 = total_tensors, done, time.perf_counter()
        if done:
            err_console().print(f"resuming: {done} of {total_tensors} tensors were already written")
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=max(total_bytes, 1), tensors=f"{done}/{total_tensors}", rate="")

    def advance(self, name, nbytes):
        self.count += 1
        self.nbytes += nbytes
        rate = self.nbytes / max(time.perf_counter() - self.t0, 1e-9) / 1e9
        self.progress.update(self.task, advance=nbytes, tensors=f"{self.count}/{self.total_tensors} tensors", rate=f"{rate:.2f} GB/s")

    def close(self):
        self.progress.stop()


def reporter(label: str, quiet: bool) -> Reporter:
    """The progress bar; under torchrun only rank 0 draws one (of its own share of the tensors)."""
    if quiet or not is_main_process():
        return NullReporter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return RichReporter(f"{label} (rank 0 of {world})" if world > 1 else label)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
