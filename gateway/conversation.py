"""A completion record's request as training rows hold it (gateway.export): its prompt, chat messages with their
tool calls or a text, and the tools it declared.

Chat prompts keep the request's messages with `role` and string `content` (text parts joined, `developer` read as
`system`), an assistant's `tool_calls` and a tool message's `tool_call_id`; messages with neither content nor tool
calls are dropped. A call's `arguments` are the object its JSON string holds, as chat templates read them (vLLM
parses them so before rendering; a string that holds no object is kept as it is). An answer's calls keep no `id`:
nothing in its row refers to it, and two answers that call the same tool alike are the same answer. A request's
tool definitions are kept as JSON: TRL's trainers read a row's `tools` column as a JSON string, and as a string it
loads with `datasets` whatever each row's schemas hold.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.records import CompletionRecord, strict_json

Messages = list[dict[str, Any]]
Prompt = Messages | str
"""A chat prompt (conversational) or a text prompt (standard)."""
Calls = list[dict[str, Any]]
"""An assistant's tool calls, as rows hold them (`tool_calls`)."""
Answer = Messages | str
"""An answer as a row holds it (`answer`)."""
CANONICAL: dict[str, Any] = {"sort_keys": True, "separators": (",", ":"), "ensure_ascii": False}
"""How a prompt's key is written (`prompt_key`)."""


def prompt_key(prompt: Prompt, tools: str | None = None) -> str:
    """The prompt's canonical JSON, with its tools: completions of the same prompt share it."""
    return json.dumps(prompt if tools is None else {"prompt": prompt, "tools": tools}, **CANONICAL)


def answer(prompt: Prompt, text: str, calls: Calls | None = None) -> Answer:
    """An answer as a row holds it: an assistant message (with the tools it called, without their ids) for a chat
    prompt, the text for a text prompt."""
    if not isinstance(prompt, list):
        return text
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [{k: v for k, v in call.items() if k != "id"} for call in calls]
    return [message]


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
    messages = [kept for message in record.request.get("messages") or [] if (kept := message_of(message))]
    # TRL renders a prompt ending in a user or tool message (generation prompt) or an assistant one (continued).
    return messages if messages and messages[-1]["role"] in ("user", "tool", "assistant") else None


def message_of(message: Any) -> dict[str, Any] | None:
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
    return kept if kept["content"] or "tool_calls" in kept or "tool_call_id" in kept else None


def tool_calls(value: Any) -> Calls | None:
    """Tool calls as rows keep them (`id`, `type`, `function` with `name` and `arguments`, an object), of those that
    name a function; None for none."""
    calls = []
    for call in value if isinstance(value, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        kept = {"type": "function", "function": {"name": function["name"], "arguments": _arguments(function)}}
        calls.append({"id": call["id"], **kept} if isinstance(call.get("id"), str) else kept)
    return calls or None


def as_sent(prompt: Messages) -> Messages:
    """A row's messages as the OpenAI API takes them: each call's arguments a JSON string (rows hold objects)."""
    return [_sent(message) if message.get("tool_calls") else message for message in prompt]


def _sent(message: dict[str, Any]) -> dict[str, Any]:
    calls = []
    for call in message["tool_calls"]:
        arguments = call["function"]["arguments"]
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append({**call, "function": {**call["function"], "arguments": arguments}})
    return {**message, "tool_calls": calls}


def _arguments(function: dict[str, Any]) -> Any:
    """A call's arguments: the object its JSON string holds (the string itself when it holds none)."""
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = strict_json(arguments)
        except (ValueError, RecursionError):  # not JSON (NaN too), or nested too deep to read: the string as it is
            return arguments
        return parsed if isinstance(parsed, dict) else arguments
    return arguments if arguments is not None else {}


def tools_of(record: CompletionRecord) -> str | None:
    """The request's tool definitions as JSON (None for none, and for a text completion)."""
    return tools_json(record.request.get("tools")) if record.request and record.endpoint != "completions" else None


def tools_json(tools: Any) -> str | None:
    """Tool definitions (a list, or its JSON) as rows carry them: canonical JSON; None for none."""
    if isinstance(tools, str):
        tools = json.loads(tools)
    return json.dumps(tools, sort_keys=True, ensure_ascii=False) if isinstance(tools, list) and tools else None


def tools_field(tools: str | None) -> dict[str, str]:
    """A row's `tools` column: present only where the request declared tools."""
    return {} if tools is None else {"tools": tools}
