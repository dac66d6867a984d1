"""The commands as library functions, each read as named steps: split (plan → run → finish, with its
manifest and dry-run plan), absorb, export (PEFT LoRA, PEFT-KaSA), spectra and push.

    from surgeon.commands.split import SplitOptions, split
    split("model", "out", SplitOptions(method="milora", rank=16))

May import every layer below (runtime, engine, methods, model, linalg, format); only the CLI and the
package's top-level API import it.
"""
