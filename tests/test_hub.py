"""Publishing and fetching through the real huggingface_hub client over HTTP, against tests/fake_hub.py.

    PYTHONPATH=$PWD python -m pytest tests/test_hub.py -q

Nothing is mocked: huggingface_hub 2.4 talks HTTP to a server on 127.0.0.1 (an ephemeral port), and the
tests look at what arrived there. In-process, the client is pointed at it by patching the constants it
reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_DISABLE_XET / HF_HOME into at import (ENDPOINT and the
resolve-URL template made from it); the subprocess test sets the real environment variables instead.
HF_HUB_DISABLE_XET: with hf_xet installed, 2.4 uploads large files through xet (a CAS server with its
own chunk protocol); disabling it makes the client use the classic path the fake hub implements
(preupload → LFS batch "basic" → PUT → NDJSON commit), the same one used where hf_xet is absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub

from surgeon.commands.push import hub_copy, push
from surgeon.commands.split import SplitOptions, split
from surgeon.engine.outdir import FILES
from surgeon.errors import HubAuthError, HubError, NotHubReadyError, SourceError
from surgeon.format.card import for_repo
from surgeon.format.hubcheck import check_folder, write_card

# huggingface_hub 2.4 itself passes a file object as `data=` to httpx2 for LFS PUTs
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
SRC = "org/tiny-llama"
TOKEN = "hf_test_token"
SOURCE_CARD = b"---\nlicense: apache-2.0\nlanguage: en\n---\n# tiny-llama\n"


def point_client_at(mp: pytest.MonkeyPatch, endpoint: str, home: Path) -> None:
    from huggingface_hub import constants as c

    mp.setattr(c, "ENDPOINT", endpoint)
    mp.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    mp.setattr(c, "HF_HUB_DISABLE_XET", True)
    mp.setattr(c, "HF_HUB_OFFLINE", False)
    mp.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
    mp.setattr(c, "HF_TOKEN_PATH", str(home / "token"))
    mp.setattr(c, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    mp.setattr(c, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
    mp.setenv("HF_TOKEN", TOKEN)
    mp.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    with FakeHub((TOKEN,)) as h, pytest.MonkeyPatch.context() as mp:
        point_client_at(mp, h.endpoint, home)
        yield h


@pytest.fixture(scope="module")
def source(hub, tiny):
    """tiny-llama served as org/tiny-llama, with a licensed card and a pickled decoy that must not be fetched."""
    files = {p.name: p.read_bytes() for p in tiny["tiny-llama"].iterdir() if p.is_file()}
    oid = hub.seed(SRC, files | {"README.md": SOURCE_CARD, "pytorch_model.bin": b"not fetched"})
    return files, oid


@pytest.fixture(scope="module")
def split_dir(hub, source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("split") / "tiny-pissa"
    split(SRC, out, SplitOptions(method="pissa", rank=4, shard_size="100KB"))
    return out


def hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def card_meta(text: str) -> dict:
    import yaml

    return yaml.safe_load(text.split("---\n")[1])


# --- download side ------------------------------------------------------------------------------


def test_split_resolves_a_hub_id_through_snapshot_download(hub, source, split_dir):
    files, oid = source
    asked = hub.requests()
    assert f"/api/models/{SRC}/revision/main" in asked  # repo_info: branch -> commit
    assert any(p.startswith(f"/api/models/{SRC}/tree/{oid}") for p in asked)  # list_repo_tree
    fetched = {p.rsplit("/", 1)[1] for p in hub.requests("GET", f"/{SRC}/resolve/{oid}/")}
    assert fetched == set(files) | {"README.md"}  # allow_patterns: weights, JSON, tokenizer, card; no .bin
    m = json.loads((split_dir / "surgeon.json").read_text())
    assert m["source"]["hub_id"] == SRC and m["source"]["revision"] == oid
    assert m["source"]["license"] == "apache-2.0"  # carried from the source card
    read = {hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest() for f in m["source"]["files"]}
    assert read == {hashlib.sha256(b).hexdigest() for n, b in files.items() if n.endswith(".safetensors")}  # the bytes served
    meta = card_meta((split_dir / "README.md").read_text())
    assert meta["base_model"] == SRC and meta["license"] == "apache-2.0" and meta["library_name"] == "peft"
    assert "pissa" in meta["tags"] and "surgeon" in meta["tags"]
    assert check_folder(split_dir).ok and len(json.loads((split_dir / "model.safetensors.index.json").read_text())["weight_map"]) > 0


def test_offline_split_uses_the_filled_cache_and_no_network(hub, split_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(hub.log)
    m = split(SRC, tmp_path / "again", SplitOptions(method="pissa", rank=4, shard_size="100KB"))
    assert len(hub.log) == n  # not one request
    first = json.loads((split_dir / "surgeon.json").read_text())
    assert m["source"]["revision"] == first["source"]["revision"]
    assert (tmp_path / "again" / "model.safetensors.index.json").read_bytes() == (split_dir / "model.safetensors.index.json").read_bytes()
    with pytest.raises(SourceError, match="not in the local cache"):
        split("org/never-downloaded", tmp_path / "never", SplitOptions(rank=4))
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        push(split_dir, "me/offline")
    assert len(hub.log) == n


def test_a_local_folder_card_license_is_carried_too(tiny, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny["tiny-llama"], src)
    (src / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n# tiny\n")
    split(str(src), tmp_path / "out", SplitOptions(rank=4))
    meta = card_meta((tmp_path / "out" / "README.md").read_text())
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "tiny-license", "LICENSE")
    assert "base_model" not in meta and "milora" in meta["tags"]
    chk = check_folder(tmp_path / "out")
    assert chk.ok and any("names no base_model" in w for w in chk.warnings)


# --- upload side --------------------------------------------------------------------------------


def test_push_sends_every_file_once_in_one_commit_and_leaves_the_folder_alone(hub, split_dir):
    before = hashes(split_dir)
    n = len(hub.log)
    r = push(split_dir, "me/tiny-pissa", private=True, commit_message="pissa split of tiny-llama")
    repo = hub.repos["me/tiny-pissa"]
    assert hub.create_payloads[-1] == {"name": "tiny-pissa", "organization": "me", "visibility": "private", "type": "model"}
    assert repo.private and r.private
    got = repo.files()
    assert set(got) == set(before) - {"surgeon.run.json", FILES} | {".gitattributes"}  # the run log and the file listing stay local
    for name in set(before) - {"surgeon.run.json", FILES}:
        want = hub_copy(split_dir, name, "me/tiny-pissa") or (split_dir / name).read_bytes()
        assert got[name] == want, name
    card = got["README.md"].decode()
    assert card == for_repo((split_dir / "README.md").read_text(), "me/tiny-pissa") and 'repo = "me/tiny-pissa"' in card
    assert json.loads(got["adapter_config.json"])["base_model_name_or_path"] == "me/tiny-pissa"
    assert [c.message for c in repo.history()] == ["pissa split of tiny-llama", "initial commit"]
    # safetensors went through LFS (batch + PUT of the sha256), the small files inline in the NDJSON commit
    put = {p.rsplit("/", 1)[1] for m, p in hub.log[n:] if m == "PUT"}
    st = {hashlib.sha256((split_dir / f).read_bytes()).hexdigest() for f in before if f.endswith(".safetensors")}
    assert put == st and repo.commits[r.commit_oid].files["model.safetensors.index.json"][1] is None
    assert hashes(split_dir) == before


def test_the_card_snippet_loads_the_pushed_repo_with_transformers(hub, split_dir, tiny):
    from transformers import AutoModelForCausalLM

    push(split_dir, "me/tiny-load")
    card = hub.repos["me/tiny-load"].files()["README.md"].decode()
    code = card.split("```python\n")[1].split("```")[0]
    ns: dict = {}
    exec(code, ns)  # downloads from the fake hub: config, residual shards, adapter
    model = ns["model"].eval()
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    ref = AutoModelForCausalLM.from_pretrained(tiny["tiny-llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
        lora_b = [m.lora_B["default"].weight for m in model.modules() if hasattr(m, "lora_B")]
        assert len(lora_b) == 14  # 2 layers x 7 projections carry the pushed adapter
        for w in lora_b:
            w.zero_()
        bare = model(ids).logits
    assert (got - want).abs().max() < 1e-4
    assert (bare - want).abs().max() > 1e-2  # the adapter matters: pissa's factors hold the principal part


def test_push_to_a_new_branch_keeps_main(hub, split_dir):
    push(split_dir, "me/tiny-branch")
    main = hub.repos["me/tiny-branch"].branches["main"]
    r = push(split_dir, "me/tiny-branch", revision="v2", commit_message="v2 upload")
    repo = hub.repos["me/tiny-branch"]
    assert "/api/models/me/tiny-branch/branch/v2" in hub.requests("POST")
    assert repo.branches["main"] == main and repo.branches["v2"] == r.commit_oid and r.revision == "v2"
    # same bytes as main: the client drops the no-op files, the commit message lands on v2
    assert repo.files("v2") == repo.files("main")


def test_dropped_connection_gives_a_clear_error_and_a_retry_finishes(hub, split_dir):
    before = hashes(split_dir)
    hub.drop("POST", "/api/models/me/tiny-net/commit/")
    with pytest.raises(HubError) as e:
        push(split_dir, "me/tiny-net", commit_message="first try")
    msg = str(e.value)
    assert "me/tiny-net" in msg and "uploading" in msg and "was not changed" in msg and "run the same command again" in msg
    assert set(hub.repos["me/tiny-net"].files()) == {".gitattributes"}  # nothing committed
    assert hashes(split_dir) == before
    n = len(hub.log)
    push(split_dir, "me/tiny-net", commit_message="retry")
    assert not [p for m, p in hub.log[n:] if m == "PUT"]  # the LFS objects were already there
    assert set(hub.repos["me/tiny-net"].files()) == set(before) - {"surgeon.run.json", FILES} | {".gitattributes"}
    assert hub.repos["me/tiny-net"].history()[0].message == "retry"


def test_a_cut_mid_lfs_upload_is_retried_by_the_client(hub, split_dir):
    hub.drop("PUT", "/lfs-upload/")  # half the body, then the connection closes
    push(split_dir, "me/tiny-put")
    got = hub.repos["me/tiny-put"].files()
    assert got["model.safetensors.index.json"] == (split_dir / "model.safetensors.index.json").read_bytes()
    assert all(got[f] == (split_dir / f).read_bytes() for f in got if f.endswith(".safetensors"))


def test_validation_lists_every_problem_and_sends_nothing(hub, split_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(split_dir, bad)
    shards = sorted(set(json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) >= 3
    (bad / shards[0]).unlink()
    data = (bad / shards[1]).read_bytes()
    (bad / shards[1]).write_bytes(data[: len(data) // 2])  # truncated
    (bad / "config.json").unlink()
    card = (bad / "README.md").read_text()
    card = card.replace(f"base_model: {SRC}", "base_model: someone/else").replace("license: apache-2.0", "license: mit").replace("- pissa\n", "")
    (bad / "README.md").write_text(card)
    n = len(hub.log)
    with pytest.raises(NotHubReadyError) as e:
        push(bad, "me/bad")
    msg = str(e.value)
    assert "6 problems" in msg
    for needle in (f"lists shard {shards[0]}, which is missing", f"{shards[1]}: truncated", "no config.json",
                   "base_model is 'someone/else'", "lack the method 'pissa'", "source card says 'apache-2.0'"):
        assert needle in msg, needle
    assert len(hub.log) == n and "me/bad" not in hub.repos
    (bad / "README.md").unlink()
    assert any("no model card" in p for p in check_folder(bad).problems)
    write_card(bad)  # the --regenerate-card fix: the card comes back from surgeon.json
    assert not any("README" in p for p in check_folder(bad).problems)


def test_token_from_env_or_stored_login_or_a_clear_error(hub, split_dir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    n = len(hub.log)
    with pytest.raises(HubAuthError, match="no Hugging Face token found: set HF_TOKEN.*hf auth login"):
        push(split_dir, "me/tiny-auth")
    assert len(hub.log) == n
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)  # what `hf auth login` stores
    try:
        push(split_dir, "me/tiny-auth")
        assert "adapter_model.safetensors" in hub.repos["me/tiny-auth"].files()
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")  # HF_TOKEN wins over the stored login
        with pytest.raises(HubAuthError, match="refused the token.*HTTP 401"):
            push(split_dir, "me/tiny-auth")
    finally:
        Path(constants.HF_TOKEN_PATH).unlink()


def test_private_is_refused_for_an_existing_public_repo(hub, split_dir):
    push(split_dir, "me/tiny-public")
    assert "visibility" not in hub.create_payloads[-1]  # no --private: the namespace's default
    with pytest.raises(HubError, match="exists and is public"):
        push(split_dir, "me/tiny-public", private=True)
    assert not hub.repos["me/tiny-public"].private


def test_cli_push_absorb_push_to_hub_and_exit_codes(hub, split_dir, tmp_path):
    from typer.testing import CliRunner

    from surgeon.cli import build_app

    app, run = build_app(), CliRunner().invoke
    r = run(app, ["push", str(split_dir), "me/cli", "--commit-message", "from the cli"])
    assert r.exit_code == 0, r.output
    assert hub.repos["me/cli"].history()[0].message == "from the cli"
    r = run(app, ["push", str(tmp_path / "nowhere"), "me/cli2"])
    assert r.exit_code == 1 and "not ready for the Hub" in r.output and "me/cli2" not in hub.repos
    assert run(app, ["push", str(split_dir)]).exit_code == 2
    r = run(app, ["push", str(split_dir), "--check"])
    assert r.exit_code == 0 and "ready for the Hub" in r.output
    r = run(app, ["absorb", str(split_dir), "--out", str(tmp_path / "merged"), "--shard-size", "100KB", "--push-to-hub", "me/merged", "-q"])
    assert r.exit_code == 0, r.output
    got = hub.repos["me/merged"].files()
    assert all(got[f] == (tmp_path / "merged" / f).read_bytes() for f in got if f.endswith((".safetensors", "index.json")))
    assert "model.safetensors.index.json" in got
    assert "adapter_model.safetensors" not in got
    meta = card_meta(got["README.md"].decode())
    assert meta["base_model"] == SRC and meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert {"pissa", "merged"} <= set(meta["tags"]) and 'repo = "me/merged"' in got["README.md"].decode()


def test_train_push_to_hub_uploads_the_trained_folder_but_not_its_resume_state(hub, split_dir, tmp_path):
    from typer.testing import CliRunner

    from surgeon.cli import build_app

    data = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "tiny_instruct.jsonl"
    out = tmp_path / "trained"
    r = CliRunner().invoke(build_app(), ["train", str(split_dir), "--data", str(data), "--out", str(out), "--steps", "2",
                                         "--seq-len", "32", "--batch-size", "2", "--save-every", "1", "--push-to-hub", "me/trained", "-q"])
    assert r.exit_code == 0, r.output
    assert (out / "train_state").is_dir()  # kept locally for --resume ...
    got = hub.repos["me/trained"].files()
    assert not any(f.startswith("train_state") for f in got)  # ... but never uploaded
    assert got["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    assert got["adapter_model.safetensors"] != (split_dir / "adapter_model.safetensors").read_bytes()  # the trained factors


def test_environment_variables_in_a_fresh_process(hub, source, tmp_path):
    """HF_ENDPOINT / HF_TOKEN / HF_HOME / HF_HUB_OFFLINE as a user sets them: split --push-to-hub, then offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"PYTHONPATH": str(ROOT), "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    cmd = [sys.executable, "-m", "surgeon", "split", SRC, "--rank", "4", "-q"]
    p = subprocess.run([*cmd, "--out", str(tmp_path / "a"), "--push-to-hub", "me/env", "--private"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert hub.repos["me/env"].private and "model.safetensors" in hub.repos["me/env"].files()
    assert (tmp_path / "home" / "hub" / "models--org--tiny-llama").is_dir()  # the download filled HF_HOME's cache
    n = len(hub.log)
    p = subprocess.run([*cmd, "--out", str(tmp_path / "b")], env=env | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert len(hub.log) == n
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
