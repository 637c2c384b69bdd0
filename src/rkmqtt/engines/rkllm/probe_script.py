"""The script of `rkmqtt probe`: its prompts, scenarios and parts, one child process each (the
probe's main thread; pure functions and data; the parts and their order: docs/rkllm-runtime.md,
"The probe's parts")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCRIPT_VERSION = 2

SPEED_PROMPT = (
    "You are helping to measure how fast a small language model runs on a single-board computer. "
    "Write a long and detailed story about a lighthouse keeper on a rocky island who finds an old "
    "radio in the cellar, repairs it over a stormy winter, and hears voices from ships that sank a "
    "hundred years ago. Describe the weather, the sea, the sounds of the radio and the keeper's "
    "thoughts in full sentences. Do not use lists or headings, do not summarise, and keep writing "
    "until you are stopped."
)
SHORT_PROMPT = "Reply with one word only: what colour is a clear sky at noon?"
# Speed runs: a different prompt per slot, long and short answers mixed, so that slots end apart.
SPEED_PROMPTS = [
    SPEED_PROMPT,
    "In one short sentence: why is the sea salty?",
    "Write a long story about a baker in a mountain village who bakes bread for the whole valley "
    "through one hard winter. Use full sentences, no lists, and keep writing until you are stopped.",
    "Name three colours, separated by commas, and nothing else.",
    "Explain in a long answer of many paragraphs how the gears of a bicycle work, for a child, "
    "with examples. Do not use lists. Keep writing until you are stopped.",
    SHORT_PROMPT,
    "Write a detailed travel diary of a week spent walking along a river from its source to the "
    "sea, one long entry per day, in full sentences. Keep writing until you are stopped.",
    "What is twelve plus thirty? Answer with the number only.",
]
CHINESE_PROMPT = "请用中文写一篇关于大海和灯塔的短文，不少于三百字，不要使用列表。"
EMOJI_PROMPT = "🌊🐚☀️🏖️🦀 Reply only with emoji like these: tell the story of a day at the beach in thirty emoji."
AFTER_PROMPT = "Say hello in one short sentence."
SHORT_SYSTEM = "You are a helpful assistant."
# ChatML (Qwen and many others); --chat-template gives the model's own, with {system} and {prompt}.
DEFAULT_CHAT_TEMPLATE = (
    "<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n"
)

_DEVICES = ["ceiling light", "lamp", "blinds", "thermostat", "speaker", "motion sensor", "window contact"]
_AREAS = ["Kitchen", "Living room", "Bedroom", "Office", "Hall", "Bathroom", "Garden", "Garage"]


@dataclass
class Scenario:
    """One step of a part: requests submitted together, once, or warm-up + repeats times."""

    name: str
    n_batch: int
    prompts: list[str]
    max_new_tokens: int
    cancel_after_tokens: dict[int, int] = field(default_factory=dict)  # request index -> TokenEvents
    cancel_all_at_ms: float | None = None  # every request is cancelled this long after its run began
    prepare: bool = False  # ask the engine's prepare() first and record its answer
    system: str | None = None  # a system message before each prompt
    token_inputs: dict[int, list[int]] = field(default_factory=dict)  # request index -> token ids
    warmup: int = 0  # runs before the measured ones
    repeats: int = 1  # measured runs
    separate: bool = False  # each prompt in a batch of its own
    ask_running: bool = False  # rkllm_is_running during the first run
    ask_kv: bool = False  # rkllm_get_kv_cache_size after the last run

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scenario:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        sc = cls(**known)
        sc.cancel_after_tokens = {int(k): int(v) for k, v in sc.cancel_after_tokens.items()}
        sc.token_inputs = {int(k): [int(t) for t in v] for k, v in sc.token_inputs.items()}
        return sc


@dataclass
class PartSpec:
    """The scenarios one engine runs in one child process, and how that engine is set up."""

    id: str
    n_batch: int
    scenarios: list[Scenario]
    settings: dict[str, Any] = field(default_factory=dict)  # Settings overrides (prompt cache: a file name)
    env: dict[str, str] = field(default_factory=dict)  # the child's extra environment
    all_finish_slots: bool = False  # the recorder reads every result at FINISH/ERROR
    why: str = ""  # what the part is for (the risk it isolates)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "scenarios": [s.to_json() for s in self.scenarios]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PartSpec:
        return cls(
            id=str(data["id"]),
            n_batch=int(data["n_batch"]),
            scenarios=[Scenario.from_json(s) for s in data["scenarios"]],
            settings=dict(data.get("settings", {})),
            env={str(k): str(v) for k, v in data.get("env", {}).items()},
            all_finish_slots=bool(data.get("all_finish_slots", False)),
            why=str(data.get("why", "")),
        )


@dataclass
class Plan:
    """What the script needs from the command line."""

    tokens: int
    max_context: int
    n_batch: list[int]
    repeats: int
    system_tokens: int
    chat_template: str
    tokenizer: Path | None


# ---- prompts made to a length ------------------------------------------------------------------------


def repeat_to_tokens(text: str, tokens_per_byte: float, target_tokens: float) -> str:
    """`text` repeated until it is about `target_tokens` tokens long."""
    unit = text + "\n\n"
    copies = max(1, round(target_tokens / (tokens_per_byte * len(unit.encode()))))
    return unit * copies


def fixed_system_prompt(tokens_per_byte: float, target_tokens: float) -> str:
    """A system prompt shaped like Home Assistant's Assist prompt (instructions, then every device)."""
    head = (
        "You are a voice assistant for Home Assistant.\nAnswer questions about the world truthfully.\n"
        "Answer in plain text. Keep it simple and to the point.\n"
        "An overview of the areas and the devices in this smart home:\n"
    )
    lines = [head]
    size, k = len(head.encode()), 0
    while size * tokens_per_byte < target_tokens:
        area, device = _AREAS[k % len(_AREAS)], _DEVICES[(k // len(_AREAS)) % len(_DEVICES)]
        line = f"- names: {area} {device} {k // (len(_AREAS) * len(_DEVICES)) + 1}\n  areas: {area}\n  state: 'off'\n"
        lines.append(line)
        size += len(line.encode())
        k += 1
    return "".join(lines)


def split_template(value: str) -> tuple[str, str, str]:
    """--chat-template ("...{system}...{prompt}...", \\n for a newline) as (head, middle, tail)."""
    text = value.replace("\\n", "\n").replace("\\t", "\t")
    if text.count("{system}") != 1 or text.count("{prompt}") != 1 or text.index("{system}") > text.index("{prompt}"):
        raise ValueError("give {system} then {prompt}, once each")
    head, rest = text.split("{system}")
    middle, tail = rest.split("{prompt}")
    return head, middle, tail


def render(template: str, system: str, prompt: str) -> str:
    head, middle, tail = split_template(template)
    return f"{head}{system}{middle}{prompt}{tail}"


def runtime_template(template: str, system: str) -> str:
    """The `rkllm_chat_template` setting (system|prefix|postfix) that puts `system` in the runtime's
    template: the system block in the system part, nothing in the prefix, the tail in the postfix."""
    head, middle, tail = split_template(template)

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("|", "\\|")

    return f"{esc(head + system + middle)}||{esc(tail)}"


# ---- figures from parts before --------------------------------------------------------------------


def calibration(done: list[dict[str, Any]], calls: list[dict[str, Any]]) -> tuple[float, float]:
    """(tokens per prompt byte, prefill ms per token) measured by speed-n1, with cautious defaults."""
    per_byte, ms_per_token = 0.3, 3.0
    for result in done:
        if result["name"] != "speed-n1" or not result.get("runs"):
            continue
        run = calls[result["runs"][-1]]
        finish = [e for e in run.get("events", []) if e.get("state") == 2 and e.get("perf")]
        if finish:
            p_ms, p_tokens = finish[-1]["perf"][0][0], finish[-1]["perf"][0][1]
            if p_tokens > 0:
                per_byte = p_tokens / len(SPEED_PROMPT.encode())
                if p_ms > 0:
                    ms_per_token = p_ms / p_tokens
    return per_byte, ms_per_token


def produced_token_ids(done: list[dict[str, Any]], calls: list[dict[str, Any]], limit: int = 48) -> list[int]:
    """Token ids the runtime produced for slot 0 in a run of n1 (to send back as a token input)."""
    for result in done:
        if result["name"] not in ("template-on-n1", "speed-n1"):
            continue
        for index in result.get("runs", []):
            ids = [
                e["slots"][0][0]
                for e in calls[index].get("events", [])
                if e.get("state") in (0, 1) and e.get("slots") and e["slots"][0][0] >= 0
            ]
            if ids:
                return ids[:limit]
    return []


def tokenizer_ids(path: Path, text: str) -> list[int]:
    """`text` in the model's token ids (tokenizer.json, read with the `tokenizers` library)."""
    from tokenizers import Tokenizer

    return list(Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids)


# ---- the plan ---------------------------------------------------------------------------------------

# A part made from the results and calls so far; one without scenarios is skipped (`why` says why).
PartMaker = Callable[[list[dict[str, Any]], list[dict[str, Any]]], PartSpec]


def plan(p: Plan) -> list[PartMaker]:
    """The parts in order, each made when its turn comes from the results and calls so far."""
    t = p.tokens
    warm, reps = 1, p.repeats
    long_prompt = repeat_to_tokens(SPEED_PROMPT, 0.3, min(400.0, p.max_context / 4))

    def fixed(part: PartSpec) -> PartMaker:
        return lambda done, calls: part

    def speed(n: int) -> Scenario:
        return Scenario(
            f"speed-n{n}", n, SPEED_PROMPTS[:n], t, ask_running=n == 1, ask_kv=True, warmup=warm, repeats=reps
        )

    def system_prompt(done: list[dict[str, Any]], calls: list[dict[str, Any]]) -> str:
        per_byte, _ = calibration(done, calls)
        return fixed_system_prompt(per_byte, min(float(p.system_tokens), p.max_context / 2))

    questions = ["Turn on the kitchen ceiling light 1.", "Is the garage blinds 2 open?"]
    makers: list[PartMaker] = [
        fixed(
            PartSpec(
                "n1",
                1,
                [
                    speed(1),
                    Scenario("chinese-n1", 1, [CHINESE_PROMPT], t),
                    Scenario("emoji-n1", 1, [EMOJI_PROMPT], t),
                    Scenario("template-on-n1", 1, [AFTER_PROMPT], min(t, 16)),
                    Scenario("unequal-prompts-alone", 1, [SHORT_PROMPT, long_prompt], t, separate=True),
                ],
                why="n_batch 1",
            )
        ),
        fixed(
            PartSpec(
                "n2",
                2,
                [
                    speed(2),
                    Scenario("chinese+emoji-n2", 2, [CHINESE_PROMPT, EMOJI_PROMPT], t),
                    Scenario("cancel-one-slot", 2, [SPEED_PROMPT] * 2, t, cancel_after_tokens={1: 3}),
                    Scenario("padding", 2, [SPEED_PROMPT], min(t, 4)),
                    Scenario("unequal-lengths-n2", 2, [SHORT_PROMPT, SPEED_PROMPT], max(4 * t, 48)),
                    Scenario("unequal-prompts-n2", 2, [SHORT_PROMPT, long_prompt], t),
                ],
                why="n_batch 2",
            )
        ),
    ]
    makers += [fixed(PartSpec(f"n{n}", n, [speed(n)], why=f"n_batch {n}")) for n in p.n_batch if 2 < n < 8]

    def cancel_prefill(done: list[dict[str, Any]], calls: list[dict[str, Any]]) -> PartSpec:
        per_byte, ms_per_token = calibration(done, calls)
        prompt = repeat_to_tokens(SPEED_PROMPT, per_byte, 0.5 * p.max_context)
        expected_ms = ms_per_token * per_byte * len(prompt.encode())
        at = round(max(1.0, 0.25 * expected_ms), 1)
        sc = Scenario("cancel-all-prefill", 1, [prompt], t, cancel_all_at_ms=at, ask_kv=True)
        return PartSpec("cancel-prefill", 1, [sc, Scenario("after-cancel", 1, [AFTER_PROMPT], min(t, 16))], why="abort")

    def tokens(n: int) -> PartMaker:
        def make(done: list[dict[str, Any]], calls: list[dict[str, Any]]) -> PartSpec:
            host = render(p.chat_template, SHORT_SYSTEM, AFTER_PROMPT)
            ids = tokenizer_ids(p.tokenizer, host) if p.tokenizer else produced_token_ids(done, calls)
            if not ids:
                return PartSpec(f"tokens-n{n}", n, [], why="no token ids to send: give --tokenizer")
            sc = Scenario(
                f"token-input-n{n}", n, [AFTER_PROMPT] * n, min(t, 16), token_inputs=dict.fromkeys(range(n), ids)
            )
            return PartSpec(f"tokens-n{n}", n, [sc], why="RKLLM_INPUT_TOKEN")

        return make

    def host(n: int) -> PartMaker:
        def make(done: list[dict[str, Any]], calls: list[dict[str, Any]]) -> PartSpec:
            system = system_prompt(done, calls)
            rendered = [render(p.chat_template, system, q) for q in questions[:n]]
            host_prompt = render(p.chat_template, SHORT_SYSTEM, AFTER_PROMPT)
            return PartSpec(
                f"host-n{n}",
                n,
                [
                    Scenario(f"template-off-n{n}", n, [AFTER_PROMPT, host_prompt][:n], min(t, 16)),
                    Scenario(f"system-prompt-host-n{n}", n, rendered, min(t, 16), warmup=warm, repeats=reps),
                ],
                settings={"rkllm_chat_template": "||"},
                why="the runtime's template off",
            )

        return make

    def cache(n: int) -> PartMaker:
        def make(done: list[dict[str, Any]], calls: list[dict[str, Any]]) -> PartSpec:
            system = system_prompt(done, calls)
            settings = {
                "rkllm_chat_template": runtime_template(p.chat_template, system),
                "rkllm_prompt_cache": f"prompt-cache-n{n}.bin",
            }
            sc = Scenario(
                f"system-prompt-cache-n{n}", n, questions[:n], min(t, 16), system=system, warmup=warm, repeats=reps
            )
            return PartSpec(f"cache-n{n}", n, [sc], settings=settings, why="prompt cache")

        return make

    def timings(done: list[dict[str, Any]], calls: list[dict[str, Any]]) -> PartSpec:
        system = system_prompt(done, calls)
        return PartSpec(
            "timings-n1",
            1,
            [
                Scenario("runtime-timings-n1", 1, [SPEED_PROMPT], t),
                Scenario(
                    "system-prompt-runtime-n1", 1, questions[:1], min(t, 16), system=system, warmup=warm, repeats=reps
                ),
            ],
            settings={"rkllm_chat_template": runtime_template(p.chat_template, system)},
            env={"RKLLM_LOG_LEVEL": "1"},
            why="the runtime's own timings",
        )

    def over_long(done: list[dict[str, Any]], calls: list[dict[str, Any]]) -> PartSpec:
        per_byte, _ = calibration(done, calls)
        prompt = repeat_to_tokens(SPEED_PROMPT, per_byte, 1.5 * p.max_context)
        return PartSpec(
            "over-long",
            1,
            [
                Scenario("over-long", 1, [prompt], t, prepare=True),
                Scenario("after-over-long", 1, [AFTER_PROMPT], min(t, 16)),
            ],
            why="a prompt over max_context",
        )

    makers += [
        cancel_prefill,
        fixed(
            PartSpec(
                "unpadded-n2",
                2,
                [Scenario("unpadded-n2", 2, [SHORT_PROMPT], min(t, 16))],
                settings={"rkllm_pad_batch": False},
                why="fewer inputs than n_batch",
            )
        ),
        tokens(1),
        tokens(2),
        host(1),
        host(2),
        cache(1),
        cache(2),
        timings,
        fixed(
            PartSpec(
                "finish-slots-n2",
                2,
                [Scenario("finish-slots-n2", 2, [SHORT_PROMPT, SPEED_PROMPT], min(t, 16))],
                all_finish_slots=True,
                why="every result read at FINISH",
            )
        ),
    ]
    if 8 in p.n_batch:
        makers.append(fixed(PartSpec("n8", 8, [speed(8)], why="n_batch 8")))
    makers.append(over_long)
    return makers
