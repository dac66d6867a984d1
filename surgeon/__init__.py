"""surgeon: model surgery for fine-tuning.

    from surgeon import split, absorb, export_lora, push
    split("path/to/model", "out", SplitOptions(method="milora", rank=64))
    push("out", "org/name", private=True)
"""

from surgeon.version import __version__


def split(model, out, opts=None, reporter=None):
    from surgeon.commands.split import split as _split

    return _split(model, out, opts, reporter)


def absorb(split_dir, out, opts=None, reporter=None):
    from surgeon.commands.absorb import absorb as _absorb

    return _absorb(split_dir, out, opts, reporter)


def export_lora(split_dir, out, overwrite=False):
    from surgeon.commands.absorb import export_lora as _export

    return _export(split_dir, out, overwrite=overwrite)


def push(folder, repo_id, private=False, revision=None, commit_message=None, token=None):
    """Check an output folder and upload it to the Hub in one commit (see surgeon.commands.push)."""
    from surgeon.commands.push import push as _push

    return _push(folder, repo_id, private=private, revision=revision, commit_message=commit_message, token=token)


__all__ = ["__version__", "absorb", "export_lora", "push", "split"]
