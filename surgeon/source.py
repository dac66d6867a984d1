"""Turn what the user typed into local files: a folder, one .safetensors file, or "org/repo[@rev]".

Hub ids are resolved with huggingface_hub.snapshot_download, fetching only weights, JSON and
tokenizer files; HF_HUB_OFFLINE and the normal cache are honoured by the library itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from surgeon.errors import PickleRefusedError, SourceError, UsageError
from surgeon.io.reader import Checkpoint

ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md", "LICENSE*"]
# files copied next to the rewritten weights
SIDE_FILES = re.compile(r"(\.json|\.model|\.txt|\.jinja|\.tiktoken|^tokenizer.*)$")
WEIGHT_FILES = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.gguf|\.index\.json|\.msgpack|\.h5)$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass
class Source:
    model: str  # as given (path or hub id)
    root: Path  # folder holding config/tokenizer files
    weights: list[Path]
    pickled: bool = False
    hub_id: str | None = None
    revision: str | None = None
    config_file: Path | None = None
    side_files: list[Path] = field(default_factory=list)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint.open_pickled(self.weights) if self.pickled else Checkpoint.open(self.weights)

    def config(self) -> dict:
        if self.config_file is None or not self.config_file.exists():
            return {}
        try:
            return json.loads(self.config_file.read_text())
        except json.JSONDecodeError as e:
            raise SourceError(f"{self.config_file}: not valid JSON ({e}).") from e

    def card_metadata(self) -> dict:
        """License fields of the source's model card (README.md front matter), carried to the output card."""
        return read_card_license(self.root / "README.md")

    def fingerprint(self) -> list[dict]:
        """Size and modification time of each weight file: absorb checks the source is unchanged."""
        # absolute(), not resolve(): a Hub snapshot's files are links into the cache's blobs, and
        # the snapshot folder (with its config.json) is what absorb needs to find again
        return [{"path": str(p.absolute()), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in self.weights]


LICENSE_KEYS = ("license", "license_name", "license_link")


def read_card_license(readme: Path) -> dict:
    """{"license": ..., "license_name": ..., "license_link": ...} from a model card; {} when unknown.

    The Hub's card metadata (https://huggingface.co/docs/hub/model-cards): `license` is an SPDX-like id,
    or "other" with `license_name` and `license_link`. A damaged card is not fatal: the license is
    then unknown, and `surgeon push` says so.
    """
    if not readme.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    try:
        meta = metadata_load(readme) or {}
    except Exception:  # yaml.YAMLError, ValueError (non-dict block), UnicodeDecodeError
        return {}
    return {k: meta[k] for k in LICENSE_KEYS if isinstance(meta.get(k), (str, list)) and meta[k]}


def _weights_in(folder: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    for index_name in ("model.safetensors.index.json",):
        index = folder / index_name
        if index.exists():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise SourceError(f"{index}: not a valid safetensors index ({e}).") from e
            missing = [f for f in files if not (folder / f).exists()]
            if missing:
                raise SourceError(f"{index} lists shards that are missing: {', '.join(missing)}; download them again.")
            return [folder / f for f in files], False
    single = folder / "model.safetensors"
    if single.exists():
        return [single], False
    st = sorted(folder.glob("*.safetensors"))
    st = [p for p in st if not p.name.startswith("adapter_")]
    if st:
        return st, False
    pick = sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("*.bin")) or sorted(folder.glob("*.pt"))
    if pick:
        if not allow_pickle:
            raise PickleRefusedError(
                f"{folder} holds only pickled weights ({pick[0].name}); pickle can run code when loaded. "
                "Convert them to safetensors, or pass --allow-pickle to load them with torch.load(weights_only=True)."
            )
        return pick, True
    raise SourceError(f"{folder} holds no model weights (no *.safetensors, no pytorch_model*.bin).")


def resolve(model: str, revision: str | None = None, config: Path | None = None, allow_pickle: bool = False) -> Source:
    path = Path(model).expanduser()
    if path.is_dir():
        weights, pickled = _weights_in(path, allow_pickle)
        cfg = Path(config) if config else path / "config.json"
        sides = sorted(p for p in path.iterdir() if p.is_file() and SIDE_FILES.search(p.name) and not WEIGHT_FILES.search(p.name))
        return Source(model, path, weights, pickled, config_file=cfg, side_files=sides)
    if path.is_file():
        if path.suffix in (".bin", ".pt", ".pth"):
            if not allow_pickle:
                raise PickleRefusedError(
                    f"{path} is a pickled checkpoint; pickle can run code when loaded. "
                    "Convert it to safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)."
                )
            pickled = True
        elif path.suffix == ".safetensors":
            pickled = False
        else:
            raise UsageError(f"{path}: expected a .safetensors file or a model folder.")
        cfg = Path(config) if config else (path.parent / "config.json")
        if not cfg.exists():
            raise UsageError(f"{path} is a single weights file and no config.json sits beside it; pass --config PATH/TO/config.json.")
        if cfg.is_dir():
            cfg = cfg / "config.json"
        sides = sorted(p for p in cfg.parent.iterdir() if p.is_file() and SIDE_FILES.search(p.name) and not WEIGHT_FILES.search(p.name))
        if cfg not in sides:
            sides.append(cfg)
        return Source(model, cfg.parent, [path], pickled, config_file=cfg, side_files=sides)
    if HUB_ID.match(model) and not model.startswith((".", "/")):
        repo_id, _, rev = model.partition("@")
        return _from_hub(repo_id, revision or rev or None, config, allow_pickle, model)
    raise SourceError(f"model {model!r} not found: no such file or folder, and it is not a Hub id like org/name.")


def _from_hub(repo_id: str, revision: str | None, config: Path | None, allow_pickle: bool, given: str) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    patterns = ALLOW_PATTERNS + (["*.bin", "*.pt"] if allow_pickle else [])
    try:
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError as e:
        raise SourceError(f"Hub repo {repo_id!r} not found (or private: log in with `hf auth login` or set HF_TOKEN).") from e
    except RevisionNotFoundError as e:
        raise SourceError(f"revision {revision!r} not found in {repo_id}.") from e
    except LocalEntryNotFoundError as e:
        raise SourceError(f"{repo_id} is not in the local cache and the Hub cannot be reached (HF_HUB_OFFLINE?): {e}") from e
    except HfHubHTTPError as e:
        raise SourceError(f"downloading {repo_id} failed: {e}") from e
    src = resolve(str(local), None, config, allow_pickle)
    src.model, src.hub_id = given, repo_id
    src.revision = revision or local.name  # snapshot folders are named by commit hash
    return src
