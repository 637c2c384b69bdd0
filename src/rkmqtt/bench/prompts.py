"""Prompts for the simulated devices (any thread; pure data).

The built-in set is short, realistic requests that a house full of devices sends: a voice
satellite, a wall panel, an automation that wants a sentence. A file replaces them: one prompt
per line, blank lines and lines starting with `#` ignored.
"""

from __future__ import annotations

from pathlib import Path

from rkmqtt.errors import ConfigError

BUILTIN_PROMPTS: tuple[str, ...] = (
    "Turn off the lights in the kitchen.",
    "Is the front door locked?",
    "Set the living room thermostat to 21 degrees.",
    "What is the weather going to be like this afternoon?",
    "Remind me to take the bins out at 7 pm.",
    "Dim the bedroom lights to 30 percent.",
    "Which windows are still open?",
    "Start the robot vacuum in the hallway.",
    "Write a one-sentence good morning message for the family.",
    "Summarise: washing machine finished, dryer running, dishwasher idle.",
    "Should I water the garden today if it rained yesterday evening?",
    "Tell the kids dinner is ready in a friendly way.",
    "The garage door has been open for an hour. What should I say on the speaker?",
    "Suggest a scene name for warm, low evening lighting.",
    "How much energy did the heat pump use today, roughly, if it ran for five hours at 2 kW?",
    "Turn on the porch light when someone arrives after sunset. Explain in one sentence.",
)


def load_prompts(path: Path | None) -> list[str]:
    """The prompts of `path` (one a line), or the built-in set when `path` is None."""
    if path is None:
        return list(BUILTIN_PROMPTS)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"--prompts {path}: cannot read it ({e.strerror or e})") from e
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompts in it (one a line; # starts a comment)")
    return prompts
