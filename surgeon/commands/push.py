"""Publish an output folder on the Hugging Face Hub: check it, then upload it in one commit.

    surgeon push OUT org/name [--private] [--revision BRANCH] [--commit-message MSG]
    surgeon split MODEL --out OUT --push-to-hub org/name          (also on absorb)

    from surgeon.commands.push import preflight, push                        # what `surgeon train` calls:
    preflight()                                                    # before the work: token, not offline
    push("out", "org/name", private=True)                          # after it

`surgeon.format.hubcheck.check_folder` lists every problem at once (a shard named by the index missing or with a damaged
header, no config.json, no model card or a card whose metadata does not match surgeon.json) and
`push` refuses to upload while any remains. Nothing in the folder is ever written.

The upload follows the `hf upload` command of huggingface_hub 2.4 (cli/upload.py): create_repo with
exist_ok, create the branch when --revision names one that does not exist yet, then commit. It uses
`create_commit` with one CommitOperationAdd per file rather than `upload_folder`: a surgeon folder is
a few dozen files at most (shards of ≤ 5 GB), far under create_commit's limits (25k LFS files, 1 GB of
regular files), and one commit makes the upload atomic, keeps the commit message exact (upload_folder's
xet pipeline may split a folder into several " (part N)" commits) and lets two files be sent naming
the repo while the local copies stay as they are (hub_copy: the card's load snippet, and the split
adapter's base_model_name_or_path, which transformers follows). Large files
still go the way the library chooses: through xet when hf_xet is installed (the default), else the
LFS batch API. A failed upload is retried by running the same command: create_commit asks the Hub
which files and LFS objects it already has (preupload, LFS batch, xet dedup) and sends only the rest.

The token comes from huggingface_hub.get_token(): HF_TOKEN, then the stored `hf auth login` token.
The endpoint is HF_ENDPOINT, as for every huggingface_hub call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from surgeon.errors import HubAuthError, HubError
from surgeon.format.card import for_repo
from surgeon.format.hubcheck import validate
from surgeon.format.hubnet import TIMEOUT_ENV, current_timeout, request_timeout
from surgeon.format.readlock import reads
from surgeon.format.splitdir import ADAPTER_CONFIG, CARD, MANIFEST


@dataclass
class PushResult:
    repo_id: str
    url: str  # the repo's page
    commit_url: str
    commit_oid: str
    revision: str
    private: bool | None
    files: list[str]
    nbytes: int
    warnings: list[str]


def require_token(token: str | None = None) -> str:
    """The token to upload with: `token`, else HF_TOKEN, else the stored `hf auth login` token."""
    from huggingface_hub import get_token

    tok = token or get_token()
    if not tok:
        raise HubAuthError(
            "no Hugging Face token found: set HF_TOKEN=hf_... or run `hf auth login` "
            "(a token with write access, from https://huggingface.co/settings/tokens)."
        )
    return tok


def preflight(token: str | None = None) -> str:
    """What a push needs before any work starts (call it before a long split or training): the Hub
    reachable in principle (HF_HUB_OFFLINE unset) and a token. Returns the token."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (or push later with `surgeon push DIR REPO`).")
    return require_token(token)


def default_message(manifest: dict) -> str:
    src = (manifest.get("source") or {}).get("hub_id") or (manifest.get("source") or {}).get("model") or "a local model"
    op, method = manifest.get("operation", "output"), manifest.get("method", "?")
    if op == "split":
        return f"surgeon split: {method} rank {manifest.get('rank')} of {src}"
    if op == "absorb":
        return f"surgeon absorb: {method} split of {src}, merged"
    return f"surgeon {op}: {method} of {src}"


@reads("folder")
def push(
    folder: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    timeout: float | None = None,
) -> PushResult:
    """Check `folder`, then upload it to the model repo `repo_id` (created if needed) in one commit.
    timeout: seconds one request may wait (default SURGEON_HUB_TIMEOUT or 60)."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    folder = Path(folder)
    chk = validate(folder)
    tok = preflight(token)
    request_timeout(timeout)
    api = HfApi(token=tok)
    branch = revision or "main"
    step = "creating the repo"
    try:
        repo_id = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model").repo_id
        step = "reading the repo"
        if branch != "main":
            try:
                api.repo_info(repo_id, revision=branch)
            except RevisionNotFoundError:
                step = f"creating branch {branch!r}"
                api.create_branch(repo_id, branch=branch, exist_ok=True)
        info = api.repo_info(repo_id)
        if private and info.private is False:
            raise HubError(
                f"{repo_id} exists and is public; --private does not change an existing repo. Make it private first "
                f"(`hf repos settings {repo_id} --private`) or push without --private."
            )
        ops = []
        for f in chk.files:
            data = hub_copy(folder, f, repo_id)
            ops.append(CommitOperationAdd(path_in_repo=f, path_or_fileobj=data if data is not None else str(folder / f)))
        step = "uploading"
        commit = api.create_commit(
            repo_id,
            ops,
            commit_message=commit_message or default_message(chk.manifest),
            revision=branch,
            repo_type="model",
        )
    except HfHubHTTPError as e:
        code = e.response.status_code if e.response is not None else None
        if code in (401, 403):
            raise HubAuthError(
                f"the Hub refused the token while {step} for {repo_id} (HTTP {code}): use a token with write access to "
                "that namespace (HF_TOKEN or `hf auth login`)."
            ) from e
        raise HubError(_failed(folder, repo_id, step, e)) from e
    except HubError:
        raise
    except Exception as e:
        # ValueError: create_commit's README.md metadata check or a malformed answer; RuntimeError: an LFS
        # upload that failed after the library's retries; OSError / httpx errors: the network.
        if isinstance(e, (ValueError, RuntimeError, OSError)) or _is_network_error(e):
            raise HubError(_failed(folder, repo_id, step, e)) from e
        raise
    return PushResult(
        repo_id=repo_id,
        url=f"{api.endpoint}/{repo_id}",
        commit_url=commit.commit_url,
        commit_oid=commit.oid,
        revision=branch,
        private=info.private,
        files=chk.files,
        nbytes=sum((folder / f).stat().st_size for f in chk.files),
        warnings=chk.warnings,
    )


def hub_copy(folder: Path, name: str, repo_id: str) -> bytes | None:
    """The bytes to upload instead of the local file, for the two files that must name the repo; else None.

    README.md: the load snippet's `repo = "..."` line (card.for_repo). adapter_config.json of a split:
    its LoRA sits on the residual in the same repo, and transformers' from_pretrained(repo_id), on
    finding adapter_config.json in a Hub repo, loads the base named by base_model_name_or_path
    (transformers/models/auto/auto_factory.py), so a null there (what split writes: the Hub id is not
    known yet) must become the repo itself. An adapter that names another base is sent as it is.
    """
    path = folder / name
    if name == CARD:
        return for_repo(path.read_text(encoding="utf-8"), repo_id).encode("utf-8")
    if name == ADAPTER_CONFIG and (folder / MANIFEST).is_file():
        conf = json.loads(path.read_text())
        if conf.get("base_model_name_or_path") in (None, "", "."):
            conf["base_model_name_or_path"] = repo_id
            return (json.dumps(conf, indent=2) + "\n").encode()
    return None


def _is_network_error(e: Exception) -> bool:
    """httpx's (huggingface_hub >= 1.0: httpx2 in 2.x) transport errors, without importing either."""
    return any(c.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3") for c in type(e).__mro__)


def _failed(folder: Path, repo_id: str, step: str, e: Exception) -> str:
    cause = f"{type(e).__name__}: {e}".strip()
    if "Timeout" in type(e).__name__:
        cause += f"; no answer within {current_timeout():g} s (--timeout or {TIMEOUT_ENV} sets the limit)"
    return (
        f"push to {repo_id} failed while {step} ({cause}). {folder} was not changed; run the same command again "
        "to finish: files the Hub already holds are not sent twice."
    )
