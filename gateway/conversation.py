"""A completion record's request as training rows hold it (gateway.export): its prompt, chat messages with their
tool calls or a text, and the tools it declared.

Chat prompts keep the request's messages with `role` and string `content` (text parts joined, `developer` read as
`system`), an assistant's `tool_calls` and a tool message's `tool_call_id`, as OpenAI sends them (a call's
`arguments` a JSON string); messages with neither content nor tool calls are dropped. A request's tool definitions
are kept as JSON: TRL's trainers read a row's `tools` column as a JSON string, and as a string it loads with
`datasets` whatever each row's schemas hold.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.dpo_pairs import Calls, Prompt
from gateway.records import CompletionRecord


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


def prompt_of(record: CompletionRecord) -> Prompt | None:
    """The record's prompt: role/content messages for chat, the string for text; None if unusable."""
    if record.request is None:
        return None
    if record.endpoint == "completions":
        prompt = record.request.get("prompt")
        return prompt if isinstance(prompt, str) and prompt else None
    messages = [kept for message in record.request.get("messages") or [] if (kept := _message(message))]
    # TRL renders a prompt ending in a user or tool message (generation prompt) or an assistant one (continued).
    return messages if messages and messages[-1]["role"] in ("user", "tool", "assistant") else None


def _message(message: Any) -> dict[str, Any] | None:
    """A prompt's message as rows keep it; None for one with neither content nor tool calls (nor a call's id)."""
    if not isinstance(message, dict):
        return None
    role = str(message.get("role") or "user")
    kept: dict[str, Any] = {
        "role": "system" if role == "developer" else role,
        "content": _content(message.get("content")),
    }
    if role == "assistant" and (calls := tool_calls(message.get("tool_calls"))):
        kept["tool_calls"] = calls
    if role == "tool" and isinstance(message.get("tool_call_id"), str):
        kept["tool_call_id"] = message["tool_call_id"]
    return kept if kept["content"] or len(kept) > 2 else None


def tool_calls(value: Any) -> Calls | None:
    """Tool calls as OpenAI sends them (`id`, `type`, `function` with `name` and `arguments` as a JSON string), of
    those that name a function; None for none."""
    calls = []
    for call in value if isinstance(value, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
        kept = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        calls.append({"id": call["id"], **kept} if isinstance(call.get("id"), str) else kept)
    return calls or None


def tools_of(record: CompletionRecord) -> str | None:
    """The request's tool definitions as JSON (None for none, and for a text completion)."""
    tools = record.request.get("tools") if record.request is not None and record.endpoint != "completions" else None
    return json.dumps(tools, ensure_ascii=False) if isinstance(tools, list) and tools else None
