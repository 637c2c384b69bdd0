"""A request's messages as the one prompt string the RKLLM runtime wraps in its chat template:
verbatim for a lone user message, else flattened into one user turn (pure; scheduler thread;
docs/rkllm-runtime.md, "Inside rkmqtt's binding")."""

from __future__ import annotations

from collections.abc import Sequence

from rkmqtt.engines.base import ChatMessage
from rkmqtt.errors import ConfigError

# What an unused slot of a padded batch reads (its output is discarded).
DUMMY_PROMPT = "Hi"

_LABELS = {"user": "User", "assistant": "Assistant", "tool": "Tool result"}


def render_prompt(messages: Sequence[ChatMessage], template_system: str | None = None) -> str:
    """The one user-turn prompt string for a request's messages (see the module docstring); a
    system message that `template_system` (the configured template's) holds is left out."""
    system = [
        m.content for m in messages if m.role == "system" and not (template_system and m.content in template_system)
    ]
    turns = [m for m in messages if m.role != "system"]
    if not system and len(turns) == 1 and turns[0].role == "user":
        return turns[0].content
    last: ChatMessage | None = turns[-1] if turns and turns[-1].role == "user" else None
    history = turns[:-1] if last is not None else turns
    parts: list[str] = []
    if system:
        parts.append("\n\n".join(system))
    if history:
        lines = ["Conversation so far:"]
        lines += [f"{_LABELS[m.role]}: {m.content}" for m in history]
        parts.append("\n".join(lines))
    if last is not None:
        parts.append(last.content)
    return "\n\n".join(parts)


def host_rendered(template: tuple[str, str, str], prompt: str) -> str:
    """The runtime's whole input for `prompt` when its own template is off: system+prefix+prompt+postfix."""
    system, prefix, postfix = template
    return f"{system}{prefix}{prompt}{postfix}"


def cached_prefix(template: tuple[str, str, str]) -> str:
    """What the prompt cache holds: the part of every host-rendered input before the prompt."""
    return template[0] + template[1]


def parse_chat_template(value: str) -> tuple[str, str, str]:
    """The `rkllm_chat_template` setting, `system|prefix|postfix`, as three strings.

    `\\n` and `\\t` in the setting stand for a newline and a tab (an environment variable or a
    flag cannot easily carry a real newline); `\\|` is a literal `|`.
    """
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            nxt = value[i + 1]
            current.append({"n": "\n", "t": "\t", "|": "|", "\\": "\\"}.get(nxt, "\\" + nxt))
            i += 2
            continue
        if c == "|":
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    parts.append("".join(current))
    if len(parts) != 3:
        raise ConfigError(
            f"setting rkllm_chat_template has {len(parts)} part(s): give system|prefix|postfix "
            "(three parts separated by '|'; \\n is a newline)"
        )
    return parts[0], parts[1], parts[2]
