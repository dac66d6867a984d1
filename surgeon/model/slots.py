"""Where a split replaces a module in a live model: the (parent, attribute, module) lookup."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from surgeon.errors import SplitDirError


def module_slot(model: nn.Module, name: str, path: Path) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, module) of the module `name`, to replace it; path names the folder in the error."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
        return parent, child, getattr(parent, child)
    except AttributeError as e:
        raise SplitDirError(f"the model built from {path}/config.json has no module {name!r}.") from e
