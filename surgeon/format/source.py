"""Turn what the user typed into local files: a folder, one .safetensors file, or "org/repo[@rev]".

Hub ids are resolved with huggingface_hub.snapshot_download, fetching only weights, JSON and
tokenizer files; HF_HUB_OFFLINE and the normal cache are honoured by the library itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from surgeon.errors import (
    JSON_READ_ERRORS,
    CorruptCheckpointError,
    PickleRefusedError,
    SourceError,
    UsageError,
)
from surgeon.format.reader import Checkpoint, regular_file

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
    index: Path | None = None  # model.safetensors.index.json, when the weights are sharded

    def checkpoint(self) -> Checkpoint:
        if self.pickled:
            return Checkpoint.open_pickled(self.weights)
        ckpt = Checkpoint.open(self.weights)
        if self.index is not None:
            check_index(self.index, read_index(self.index), ckpt)
        return ckpt

    def config(self) -> dict:
        if self.config_file is None or not self.config_file.exists():
            return {}
        try:
            conf = json.loads(self.config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise SourceError(f"{self.config_file}: not valid JSON ({e}); fix it or pass --config.") from None
        if not isinstance(conf, dict):
            raise SourceError(f"{self.config_file}: not a JSON object; fix it or pass --config.")
        return conf

    def card_metadata(self) -> dict:
        """License fields of the source's model card (README.md front matter), carried to the output card."""
        card = self.root / "README.md"
        return read_card_license(confined(self.root, card.name, "the folder")) if card.exists() or card.is_symlink() else {}

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


def inside(path: Path, folder: Path) -> bool:
    """Whether `path`, links followed, lies in `folder`. A Hub cache snapshot
    (models--org--name/snapshots/REV/) may link into its repo's own blobs/ folder too."""
    real, root = path.resolve(), folder.resolve()
    if real.is_relative_to(root):
        return True
    if root.parent.name == "snapshots":  # huggingface_hub's cache layout
        return real.is_relative_to(root.parent.parent / "blobs")
    return False


def confined(folder: Path, name: str, what: str) -> Path:
    """folder/name, refused unless it is a regular file inside `folder` (no absolute names, no ..,
    no link out of the folder): surgeon reads only the model's own files."""
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts:
        raise SourceError(f"{what} names {name!r}, which is outside {folder}; surgeon reads only files inside the model folder.")
    path = folder / p
    if not inside(path, folder):
        raise SourceError(f"{what} names {name!r}, which links to {path.resolve()} outside {folder}; surgeon reads only files inside the model folder.")
    if not path.exists():
        raise SourceError(f"{what} names {name!r}, which is missing from {folder}; download it again.")
    regular_file(path)
    return path


def read_index(index: Path) -> dict[str, str]:
    """The weight_map of a model.safetensors.index.json: {tensor: shard file name}, validated."""
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
    except JSON_READ_ERRORS as e:
        raise SourceError(f"{index}: not a valid safetensors index ({e}); download it again.") from None
    wmap = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise SourceError(f"{index}: not a valid safetensors index (it needs a \"weight_map\" object of tensor → file names); download it again.")
    return wmap


def check_index(index: Path, wmap: dict[str, str], ckpt: Checkpoint) -> None:
    """The index must name exactly the tensors its shards hold, each in the shard it says."""
    for name, shard in wmap.items():
        info = ckpt.tensors.get(name)
        if info is None:
            raise CorruptCheckpointError(f"{index} maps {name!r} to {shard}, which does not hold it; the download is incomplete, download it again.")
        if info.file.name != Path(shard).name:
            raise CorruptCheckpointError(f"{index} maps {name!r} to {shard}, but it is in {info.file.name}; download the index again.")
    extra = sorted(set(ckpt.tensors) - set(wmap))
    if extra:
        raise CorruptCheckpointError(f"{ckpt.tensors[extra[0]].file} holds {extra[0]!r}, which {index.name} does not list ({len(extra)} such); download the index again.")


def _weights_in(folder: Path, allow_pickle: bool) -> tuple[list[Path], bool, Path | None]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        confined(folder, index.name, "the folder")
        files = sorted(set(read_index(index).values()))
        return [confined(folder, f, index.name) for f in files], False, index
    single = folder / "model.safetensors"
    if single.exists():
        return [confined(folder, single.name, "the folder")], False, None
    st = [p for p in sorted(folder.glob("*.safetensors")) if not p.name.startswith("adapter_")]
    if st:
        return [confined(folder, p.name, "the folder") for p in st], False, None
    pick = sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("*.bin")) or sorted(folder.glob("*.pt"))
    if pick:
        if not allow_pickle:
            raise PickleRefusedError(
                f"{folder} holds only pickled weights ({pick[0].name}); pickle can run code when loaded. "
                "Convert them to safetensors, or pass --allow-pickle to load them with torch.load(weights_only=True)."
            )
        return [confined(folder, p.name, "the folder") for p in pick], True, None
    raise SourceError(f"{folder} holds no model weights (no *.safetensors, no pytorch_model*.bin).")


def _side_files(folder: Path) -> list[Path]:
    """config, tokenizer and template files to copy beside the output; links out of the folder are refused."""
    names = sorted(p.name for p in folder.iterdir() if SIDE_FILES.search(p.name) and not WEIGHT_FILES.search(p.name))
    return [confined(folder, n, "the folder") for n in names if not (folder / n).is_dir()]  # a FIFO or device is refused, not skipped


def resolve(model: str, revision: str | None = None, config: Path | None = None, allow_pickle: bool = False) -> Source:
    path = Path(model).expanduser()
    if path.is_dir():
        weights, pickled, index = _weights_in(path, allow_pickle)
        cfg = _config_path(config, path / "config.json", path)
        sides = [p for p in _side_files(path) if p.name != "config.json"] + [cfg]
        return Source(model, path, weights, pickled, config_file=cfg, side_files=sides, index=index)
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
        regular_file(path)
        cfg = _config_path(config, path.parent / "config.json", path)
        sides = [p for p in _side_files(cfg.parent) if p.name != "config.json"] + [cfg]
        return Source(model, cfg.parent, [path], pickled, config_file=cfg, side_files=sides)
    if HUB_ID.match(model) and not model.startswith((".", "/")):
        repo_id, _, rev = model.partition("@")
        return _from_hub(repo_id, revision or rev or None, config, allow_pickle, model)
    raise SourceError(f"model {model!r} not found: no such file or folder, and it is not a Hub id like org/name.")


def _config_path(given: Path | None, default: Path, model: Path) -> Path:
    """The config.json to use: --config (a file, or a folder holding one), else the one beside the weights."""
    cfg = Path(given).expanduser() if given else default
    if cfg.is_dir():
        cfg = cfg / "config.json"
    if not cfg.is_file():
        where = f"--config {given}" if given else f"{model} (no config.json)"
        raise UsageError(f"{where}: the output would have no config.json and transformers could not load it; pass --config PATH/TO/config.json.")
    if not given and not inside(cfg, default.parent):
        raise SourceError(f"{cfg} links to {cfg.resolve()} outside {default.parent}; surgeon reads only files inside the model folder.")
    regular_file(cfg)
    return cfg


def _from_hub(repo_id: str, revision: str | None, config: Path | None, allow_pickle: bool, given: str) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from surgeon.format.hubnet import (
        TIMEOUT_ENV,
        cause,
        is_network_error,
        request_timeout,
    )

    patterns = ALLOW_PATTERNS + (["*.bin", "*.pt"] if allow_pickle else [])
    request_timeout()  # every request, the file list's included: a server that never answers must not hang the split
    fix = f"check the network and HF_ENDPOINT, or allow more time with {TIMEOUT_ENV}=SECONDS"
    try:
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError as e:
        raise SourceError(f"Hub repo {repo_id!r} not found (or private: log in with `hf auth login` or set HF_TOKEN).") from e
    except RevisionNotFoundError as e:
        raise SourceError(f"revision {revision!r} not found in {repo_id}.") from e
    except LocalEntryNotFoundError as e:
        if e.__cause__ is None or not is_network_error(e.__cause__):
            raise SourceError(f"{repo_id} is not in the local cache and the Hub cannot be reached (HF_HUB_OFFLINE?): {' '.join(str(e).split())}") from e
        raise SourceError(f"{repo_id} is not in the local cache and the Hub cannot be reached ({cause(e)}); {fix}.") from e
    except HfHubHTTPError as e:
        raise SourceError(f"downloading {repo_id} failed: {e}") from e
    except Exception as e:
        if not is_network_error(e):
            raise
        raise SourceError(f"downloading {repo_id} failed ({cause(e)}); {fix}, then run the same command again.") from e
    src = resolve(str(local), None, config, allow_pickle)
    src.model, src.hub_id = given, repo_id
    src.revision = revision or local.name  # snapshot folders are named by commit hash
    return src
