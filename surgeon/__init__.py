"""surgeon: model surgery for fine-tuning.

    from surgeon import split, absorb, export_lora
    split("path/to/model", "out", SplitOptions(method="milora", rank=64))
"""

__version__ = "0.1.0"


def split(model, out, opts=None, reporter=None):
    from surgeon.pipeline import split as _split

    return _split(model, out, opts, reporter)


def absorb(split_dir, out, opts=None, reporter=None):
    from surgeon.absorb import absorb as _absorb

    return _absorb(split_dir, out, opts, reporter)


def export_lora(split_dir, out, overwrite=False):
    from surgeon.absorb import export_lora as _export

    return _export(split_dir, out, overwrite=overwrite)


__all__ = ["__version__", "absorb", "export_lora", "split"]
