"""The model as transformers loads it: the meta-device skeleton built from config.json, and every
checkpoint key mapped to the loaded parameter it becomes (transformers' own conversion rules).

    from surgeon.model import load_names
    names = load_names(config_dict, checkpoint_keys)   # a NameMap, or None when transformers cannot build it
"""

from surgeon.model.names import NameMap, Place, load_names  # noqa: F401
from surgeon.model.skeleton import build_skeleton  # noqa: F401
