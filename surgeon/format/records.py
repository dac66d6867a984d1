"""Text records in the shapes instruction data ships in, brought to three forms.

    from surgeon.format.records import normalize
    normalize({"instruction": "Add", "input": "2+2", "output": "4"}, "data.jsonl, line 3")
    # -> {"prompt": "Add\n\n2+2", "completion": "4"}

Formats (detected from the keys of each record, or forced by name):

    text                {"text": ...}
    prompt-completion   {"prompt": ..., "completion": ...}
    messages            {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}   (OpenAI / TRL chat)
    alpaca              {"instruction": ..., "input": ... (optional), "output": ...}
    sharegpt            {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}

and come out as {"text"}, {"prompt", "completion"} or {"messages"} (roles system/user/assistant):
alpaca becomes a prompt-completion pair (instruction, a blank line, input), sharegpt becomes
messages. `surgeon train` takes the loss on the completion or the assistant turns; `surgeon check`
reads the text. Errors are DataError naming the place, the keys found and the formats accepted.
"""

from __future__ import annotations

from surgeon.errors import SurgeonError

FORMATS = ("text", "prompt-completion", "messages", "alpaca", "sharegpt")
FORMAT_HINT = ('one JSON object per line: {"text": ...}, {"prompt": ..., "completion": ...}, {"messages": [{"role", "content"}, ...]}, '
               '{"instruction", "input", "output"} or {"conversations": [{"from", "value"}, ...]}; other keys: map them with --columns')
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
                  "bing": "assistant", "model": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


class DataError(SurgeonError):
    """The training or evaluation data file is missing, malformed or empty."""


def detect(obj: dict) -> str | None:
    """The format of one record from its keys (None when none fits)."""
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "text" in obj:
        return "text"
    if "prompt" in obj and "completion" in obj:
        return "prompt-completion"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    return None


def normalize(obj, where: str, fmt: str | None = None) -> dict:
    """The record as {"text"}, {"prompt", "completion"} or {"messages"}; DataError naming `where`."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a JSON {type(obj).__name__}, not an object; expected {FORMAT_HINT}.")
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"format {fmt!r} unknown; choose {', '.join(FORMATS)}.")
    fmt = fmt or detect(obj)
    if fmt is None:
        raise DataError(f"{where}: keys {sorted(obj)} match no format; expected {FORMAT_HINT}.")
    if fmt == "messages":
        return {"messages": _turns(obj, "messages", "role", "content", {r: r for r in ROLES}, where)}
    if fmt == "sharegpt":
        return {"messages": _turns(obj, "conversations", "from", "value", SHAREGPT_ROLES, where)}
    if fmt == "alpaca":
        _strings(obj, where, "instruction", "output")
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: 'input' must be a string, got {type(extra).__name__}.")
        prompt = obj["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        return _nonempty({"prompt": prompt, "completion": obj["output"]}, "output", where, obj["output"])
    keys = ("text",) if fmt == "text" else ("prompt", "completion")
    _strings(obj, where, *keys)
    return _nonempty({k: obj[k] for k in keys}, keys[-1], where)


def _strings(obj: dict, where: str, *keys: str) -> None:
    for k in keys:
        if k not in obj:
            raise DataError(f"{where}: no {k!r} (keys {sorted(obj)}); expected {FORMAT_HINT}.")
        if not isinstance(obj[k], str):
            raise DataError(f"{where}: {k!r} must be a string, got {type(obj[k]).__name__}.")


def _nonempty(rec: dict, key: str, where: str, value: str | None = None) -> dict:
    if not (value if value is not None else rec[key]).strip():
        raise DataError(f"{where}: {key!r} is empty, so the example carries no loss; remove the line or fill it in.")
    return rec


def _turns(obj: dict, key: str, role_key: str, text_key: str, roles: dict[str, str], where: str) -> list[dict]:
    """[{"role", "content"}] of a chat record; at least one non-empty assistant turn."""
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {key!r} must be a non-empty list of turns.")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get(text_key), str) or t.get(role_key) not in roles:
            raise DataError(f"{where}: turn {i} of {key!r} must be {{{role_key!r}: one of {sorted(roles)}, {text_key!r}: a string}}, got {t!r:.80}.")
        out.append({"role": roles[t[role_key]], "content": t[text_key]})
    if not any(t["role"] == "assistant" and t["content"].strip() for t in out):
        raise DataError(f"{where}: no assistant turn with text, so the example carries no loss; remove the line or add the answer.")
    return out


def plain_text(rec: dict) -> str:
    """The record as plain text (what `surgeon check` measures perplexity on)."""
    if "text" in rec:
        return rec["text"]
    if "prompt" in rec:
        return f"{rec['prompt']}\n{rec['completion']}"
    return "\n".join(t["content"] for t in rec["messages"])
