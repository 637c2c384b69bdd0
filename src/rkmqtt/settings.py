"""Settings (main thread, at start-up): pydantic-settings, layered: flags > `RKMQTT_*` > the YAML
file (`--config`, `RKMQTT_CONFIG`, else ./config.yaml) > the add-on's options > the model's own
(`MODEL_DEFAULTED`) > defaults. Each field is also `RKMQTT_<NAME>` and `--<name-with-dashes>`;
`config.yaml` lists them all (generated: `./dev docs`)."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from rkmqtt.errors import ConfigError
from rkmqtt.suggest import did_you_mean
from rkmqtt.topics import shared_group_of

# Rockchip's manual recommends n_batch <= 8 (not a limit of the runtime, whose field is a uint8):
# rkmqtt keeps to the recommendation, since nothing is known of larger batches (docs/rkllm-runtime.md).
RKLLM_MAX_BATCH = 8


def rkllm_n_batch_problem(n_batch: int) -> str | None:
    """The one statement of the rule, for settings and for engines built from unvalidated copies."""
    if 1 <= n_batch <= RKLLM_MAX_BATCH:
        return None
    return (
        f"n_batch={n_batch} is not allowed with engine rkllm: use 1 to {RKLLM_MAX_BATCH} "
        "(the RKLLM manual's recommended maximum)"
    )


ENV_PREFIX = "RKMQTT_"
#: The settings file every command reads from the current folder when none is named.
CONFIG_FILE_NAME = "config.yaml"
#: `RKMQTT_*` variables that are not settings: the file's, and those of the repository's own tools.
NOT_SETTINGS = frozenset({"CONFIG", "VENV", "TORCH_INDEX", "REFERENCE", "BENCH_UNSET"})

#: Settings whose default depends on the engine's model when no layer (flag, environment, file,
#: add-on option) sets them; the service resolves them once the engine is loaded. config.yaml
#: shows them commented out, so that a copy of it does not pin them.
MODEL_DEFAULTED = ("temperature", "repeat_penalty")
DEFAULT_BROKER_PORT = 1883
DEFAULT_TLS_PORT = 8883


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, case_sensitive=False
    )

    # -- MQTT -----------------------------------------------------------------------------
    broker: Annotated[
        str | None,
        Field(
            description="Broker URL: mqtt://[user@]host[:port], mqtts:// for TLS. Empty: localhost:1883, "
            "or a private Mosquitto started by `rkmqtt run` when nothing answers there. Keep the password out of "
            "it (a command line is visible to every user of the machine): use password_file or RKMQTT_PASSWORD."
        ),
    ] = None
    username: Annotated[str | None, Field(description="Broker user name (overrides the URL's).")] = None
    password: Annotated[
        SecretStr | None, Field(description="Broker password (overrides password_file and the URL's).")
    ] = None
    password_file: Annotated[
        Path | None,
        Field(description="File holding the broker password (a trailing newline is ignored); overrides the URL's."),
    ] = None
    mqtt_version: Annotated[Literal["5", "3.1.1"], Field(description="MQTT protocol version.")] = "5"
    client_id: Annotated[
        str | None,
        Field(
            description="MQTT client id of the bridge's persistent session. Empty: rkmqtt-<node name>, stable "
            "across restarts. Two bridges must not share one.",
            max_length=128,
        ),
    ] = None
    session_expiry: Annotated[
        int,
        Field(
            ge=0,
            le=4_294_967_295,
            description="Seconds the broker keeps the bridge's session, and the requests sent to it, while the "
            "bridge is away (MQTT 5); 0 is a clean session that forgets them.",
        ),
    ] = 86_400
    tls_ca: Annotated[Path | None, Field(description="CA certificate file for mqtts:// (empty: system CAs).")] = None
    tls_cert: Annotated[Path | None, Field(description="Client certificate file for mqtts://.")] = None
    tls_key: Annotated[Path | None, Field(description="Client key file for mqtts://.")] = None
    tls_insecure: Annotated[bool, Field(description="Skip the broker's host name check (testing only).")] = False
    keepalive: Annotated[int, Field(ge=5, le=3600, description="MQTT keep-alive, seconds.")] = 30
    topic_prefix: Annotated[
        str,
        Field(
            pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
            max_length=200,
            description="Prefix P of every topic (P/request/<client>, P/reply/..., P/node/<node>/status).",
        ),
    ] = "rkmqtt"
    share_requests: Annotated[
        Literal["auto", "on", "off"],
        Field(
            description="Share the requests with the other bridges (nodes) on this broker and prefix, each request "
            "to one of them. auto: a plain subscription while this node is alone (Mosquitto keeps it across its "
            "restarts), a shared one as soon as another node is online; on: always shared; off: this bridge takes "
            "every request (a warning when another node is online: both would answer)."
        ),
    ] = "auto"
    shared_group: Annotated[
        str | None,
        Field(
            pattern=r"^[A-Za-z0-9_-]{1,64}$",
            description="Name of the shared subscription ($share/<group>/P/request/+). Empty: the topic prefix "
            "(with _ for /), so bridges of one prefix share and bridges of two prefixes do not.",
        ),
    ] = None
    outgoing_queue: Annotated[
        int, Field(ge=100, le=10_000_000, description="Bound on messages waiting to be published.")
    ] = 20_000
    outgoing_queue_bytes: Annotated[
        int,
        Field(
            ge=65_536,
            le=1 << 34,
            description="Bound on the bytes (payload, topic, correlation) of messages waiting to be published. "
            "Past either bound stream chunks are dropped; final replies never are.",
        ),
    ] = 16 * 1024 * 1024

    # -- engine ---------------------------------------------------------------------------
    engine: Annotated[
        str,
        Field(
            description="auto (rkllm on an RK3588/RK3576 with the runtime installed, else numpy), numpy, rkllm, "
            "openai (an OpenAI-compatible server at upstream_url), or module:Class of a custom engine."
        ),
    ] = "auto"
    model: Annotated[
        str | None,
        Field(
            description="Model file: a .gguf for numpy (empty: the packaged SmolLM2-135M-Instruct), a .rkllm for rkllm."
        ),
    ] = None
    n_batch: Annotated[
        int,
        Field(
            ge=1,
            le=64,
            description="Requests per batch (engine slots). rkllm: 1-8, the RKLLM manual's recommendation; "
            "openai: requests in flight upstream.",
        ),
    ] = 4
    batch_window_ms: Annotated[
        float,
        Field(ge=0, le=10_000, description="Static batching: wait this long for batch-mates after the first request."),
    ] = 30.0
    max_context: Annotated[int, Field(ge=64, le=131_072, description="Context length per slot, tokens.")] = 2048
    default_new_tokens: Annotated[
        int, Field(ge=1, le=1_000_000, description="max_new_tokens of a request that gives none.")
    ] = 256
    temperature: Annotated[
        float,
        Field(
            ge=0,
            le=5,
            description="Default temperature (0 is greedy). Unset: the model's own if the engine knows one (numpy "
            "engine, SmolLM2-135M: 0, greedy), else 0.7.",
        ),
    ] = 0.7
    top_k: Annotated[int, Field(ge=0, le=100_000, description="Default top-k (0 is off).")] = 40
    top_p: Annotated[float, Field(gt=0, le=1, description="Default top-p.")] = 0.9
    repeat_penalty: Annotated[
        float,
        Field(
            ge=0.1,
            le=10,
            description="Default repeat penalty (1 is off). Unset: the model's own if the engine knows one (numpy "
            "engine, SmolLM2-135M: 1.05), else 1.1.",
        ),
    ] = 1.1

    numpy_threads: Annotated[
        int,
        Field(
            ge=0,
            le=256,
            description="Math (BLAS) threads of the numpy engine; 0 leaves BLAS's own choice (OpenBLAS: one per "
            "core, or OPENBLAS_NUM_THREADS). Set 1 on a machine whose cores are busy with other work: BLAS threads "
            "that wait on each other run 2-3x slower there.",
        ),
    ] = 0

    # -- openai engine (an OpenAI-compatible server behind the bridge) -----------------------
    upstream_url: Annotated[
        str | None,
        Field(
            description="engine openai: the server's OpenAI API base, ending in /v1, e.g. http://gpu:8000/v1 "
            "(vLLM), http://minipc:8080/v1 (llama.cpp's server), http://minipc:11434/v1 (Ollama)."
        ),
    ] = None
    upstream_model: Annotated[
        str | None,
        Field(description="engine openai: the model to ask for. Empty: the first the server lists (GET /v1/models)."),
    ] = None
    upstream_api_key: Annotated[
        SecretStr | None,
        Field(
            description="engine openai: the server's API key (sent as a bearer token); overrides upstream_api_key_file."
        ),
    ] = None
    upstream_api_key_file: Annotated[
        Path | None,
        Field(description="engine openai: file holding the server's API key (a trailing newline is ignored)."),
    ] = None
    upstream_timeout: Annotated[
        float,
        Field(
            gt=0,
            le=86_400,
            description="engine openai: seconds the server may stay silent in an answer before the request fails "
            "(engine_error).",
        ),
    ] = 120.0

    # -- limits (each answered with its own error code) ------------------------------------
    max_payload_bytes: Annotated[
        int, Field(ge=64, le=16 * 1024 * 1024, description="Largest request payload (payload_too_large).")
    ] = 65_536
    max_correlation_bytes: Annotated[
        int,
        Field(
            ge=0,
            le=65_535,
            description="Longest MQTT 5 Correlation Data, which is echoed on every reply and stream chunk "
            "(correlation_too_large).",
        ),
    ] = 256
    max_reply_topic_chars: Annotated[
        int,
        Field(
            ge=32,
            le=16_000,
            description="Longest reply topic a request may ask for, as Response Topic or reply_to (reply_to_too_long).",
        ),
    ] = 256
    max_prompt_chars: Annotated[
        int, Field(ge=1, le=10_000_000, description="Longest prompt, system and messages together (too_long).")
    ] = 16_000
    max_new_tokens: Annotated[
        int, Field(ge=1, le=1_000_000, description="Largest max_new_tokens a request may ask for (too_many_tokens).")
    ] = 1024
    max_queue: Annotated[int, Field(ge=1, le=1_000_000, description="Requests waiting for a slot (busy).")] = 64
    rate_limit: Annotated[
        float,
        Field(ge=0, le=1_000_000, description="Requests per minute per client, sustained; 0 is off (rate_limited)."),
    ] = 120.0
    rate_burst: Annotated[int, Field(ge=1, le=1_000_000, description="Requests a client may send at once.")] = 20

    # -- life cycle -----------------------------------------------------------------------
    grace_period: Annotated[
        float, Field(ge=0, le=3600, description="On SIGTERM, seconds running requests get to finish.")
    ] = 30.0
    stats_interval: Annotated[
        float, Field(ge=0.5, le=3600, description="Seconds between P/node/<node>/stats messages.")
    ] = 5.0
    dedup_window: Annotated[
        float, Field(ge=0, le=86_400, description="Seconds a finished reply is kept to answer a retried id.")
    ] = 300.0
    embedded_broker: Annotated[
        bool, Field(description="Start a private Mosquitto when no broker is set and none answers on localhost:1883.")
    ] = True
    state_dir: Annotated[
        Path | None,
        Field(
            description="Directory of the request journal (and the private Mosquitto's data). Empty: "
            "$XDG_STATE_HOME/rkmqtt or ~/.local/state/rkmqtt; /data for the add-on."
        ),
    ] = None
    journal: Annotated[
        bool,
        Field(
            description="Keep accepted requests in a journal (SQLite) until their final reply is delivered, so "
            "that a restart takes them up again and a retried id gets its recorded reply."
        ),
    ] = True
    journal_max_mb: Annotated[
        float, Field(gt=0, le=100_000, description="Size above which the oldest finished journal entries go.")
    ] = 64.0
    health_file: Annotated[
        Path | None,
        Field(description="File the service rewrites every second for `rkmqtt health` (container HEALTHCHECK)."),
    ] = None
    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], Field(description="Log level.")] = "INFO"

    # -- rkllm engine -----------------------------------------------------------------------
    rkllm_library: Annotated[
        str | None, Field(description="Path of librkllmrt.so (empty: the usual places and the loader's path).")
    ] = None
    rkllm_abi: Annotated[
        Literal["auto", "1.2", "1.3"],
        Field(description="Runtime ABI; auto reads the version string inside the library."),
    ] = "auto"
    rkllm_cpus: Annotated[
        str,
        Field(
            pattern=r"^(auto|[0-7](,[0-7])*)$",
            description="CPU cores for the runtime, e.g. 4,5,6,7; auto: the SoC's big cores (RK3588/RK3576: "
            "4,5,6,7; RK3562: 0,1,2,3).",
        ),
    ] = "auto"
    rkllm_n_keep: Annotated[int, Field(ge=-1, le=131_072, description="Tokens kept when the context shifts.")] = -1
    rkllm_skip_special_token: Annotated[bool, Field(description="Drop special tokens from the output.")] = True
    rkllm_base_domain_id: Annotated[int, Field(ge=0, le=255, description="NPU memory domain of the model.")] = 0
    rkllm_embed_flash: Annotated[bool, Field(description="Keep the embedding table in flash, not RAM.")] = False
    rkllm_pad_batch: Annotated[
        bool,
        Field(
            description="Fill unused slots of a batch with a dummy prompt (the runtime may need all n_batch inputs)."
        ),
    ] = True
    rkllm_tokenizer: Annotated[
        Path | None,
        Field(
            description="The model's tokenizer.json, to count prompt tokens exactly and refuse an over-long prompt "
            "(too_long) before it stops a whole batch; empty: a safe bound of one token per UTF-8 byte."
        ),
    ] = None
    rkllm_chat_template: Annotated[
        str | None,
        Field(
            description="system|prefix|postfix for rkllm_set_chat_template, separated by '|' "
            "(empty: the model's built-in template)."
        ),
    ] = None
    rkllm_prompt_cache: Annotated[
        Path | None,
        Field(
            description="File for the runtime's prompt cache of the fixed system prompt (the system part of "
            "rkllm_chat_template): made at the first start, loaded at each. Empty: off (until `rkmqtt probe` on "
            "your board shows it cuts the time to first token at your n_batch)."
        ),
    ] = None

    # -- Home Assistant -------------------------------------------------------------------
    discovery: Annotated[bool, Field(description="Publish Home Assistant MQTT discovery.")] = True
    discovery_prefix: Annotated[
        str, Field(pattern=r"^[A-Za-z0-9_-]+$", description="Home Assistant's discovery prefix.")
    ] = "homeassistant"
    node_name: Annotated[
        str | None,
        Field(
            pattern=r"^[A-Za-z0-9_-]{1,64}$",
            description="This bridge's name among the bridges of a broker: its P/node/<node>/ topics, its Home "
            "Assistant device, its MQTT session and journal. Empty: rkmqtt_<host> (with _<prefix> for another "
            "topic prefix).",
        ),
    ] = None

    # -- HTTP API (Ollama and OpenAI compatible) ----------------------------------------------
    http_listen: Annotated[
        str | None,
        Field(
            description="host:port of the Ollama- and OpenAI-compatible HTTP API, e.g. 127.0.0.1:11434 or "
            "0.0.0.0:11434 ([::]:11434 for IPv6). Empty: no HTTP API."
        ),
    ] = None
    http_tokens: Annotated[
        SecretStr | None,
        Field(
            description="Bearer tokens of the HTTP API as name:token,name:token; a request's client name (its fair "
            "share of the queue, its rate limit) is its token's name. Empty: no authentication, every request is "
            "client http_client."
        ),
    ] = None
    http_client: Annotated[
        str,
        Field(
            pattern=r"^[A-Za-z0-9_-]{1,64}$",
            description="Client name of HTTP requests when http_tokens is empty.",
        ),
    ] = "http"

    # -- validators ---------------------------------------------------------------------------
    @field_validator(
        "broker",
        "model",
        "rkllm_library",
        "rkllm_tokenizer",
        "rkllm_chat_template",
        "rkllm_prompt_cache",
        "client_id",
        "shared_group",
        "node_name",
        "username",
        "state_dir",
        "password_file",
        "http_listen",
        "http_tokens",
        "upstream_url",
        "upstream_model",
        "upstream_api_key",
        "upstream_api_key_file",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and v.strip() == "" else v

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v if "://" in v else f"mqtt://{v}")
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError("must be mqtt://[user:pass@]host[:port] or mqtts://...")
        if not parts.hostname:
            raise ValueError("has no host: use mqtt://[user:pass@]host[:port]")
        try:
            port = parts.port
        except ValueError as e:
            raise ValueError("has a port that is not a number from 1 to 65535") from e
        if port is not None and not 0 < port < 65536:
            raise ValueError("has a port that is not a number from 1 to 65535")
        return v

    @field_validator("upstream_url")
    @classmethod
    def _check_upstream_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be the server's API base, http://host:port/v1 or https://...")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as e:
            raise ValueError("has a port that is not a number from 1 to 65535") from e
        return v

    @field_validator("password_file", "upstream_api_key_file")
    @classmethod
    def _password_file(cls, v: Path | None) -> Path | None:
        if v is None:
            return v
        try:
            _read_password(v)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot be read ({type(e).__name__}): give a file readable by this user") from None
        return v

    @field_validator("tls_ca", "tls_cert", "tls_key")
    @classmethod
    def _readable_file(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError("is not a file that exists: give the path of a PEM file")
        return v

    @field_validator("http_listen")
    @classmethod
    def _check_http_listen(cls, v: str | None) -> str | None:
        if v is not None:
            parse_listen(v)
        return v

    @field_validator("http_tokens")
    @classmethod
    def _check_http_tokens(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            parse_tokens(v.get_secret_value())
        return v

    @field_validator("engine")
    @classmethod
    def _check_engine(cls, v: str) -> str:
        if v in ("auto", "numpy", "rkllm", "openai") or (":" in v and all(v.split(":", 1))):
            return v
        raise ValueError("must be auto, numpy, rkllm, openai or module:Class")

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.default_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_new_tokens ({self.default_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})"
            )
        if self.engine == "rkllm" and (problem := rkllm_n_batch_problem(self.n_batch)):
            raise ValueError(problem)
        if self.engine == "openai" and self.upstream_url is None:
            raise ValueError("engine openai needs upstream_url: the server's API base, e.g. http://127.0.0.1:8080/v1")
        return self

    # -- derived ------------------------------------------------------------------------------
    @property
    def broker_url(self) -> BrokerAddress:
        password = self.password
        if password is None and self.password_file is not None:
            password = SecretStr(_read_password(self.password_file))
        return BrokerAddress.parse(self.broker or "mqtt://localhost:1883", self.username, password)

    def upstream_key(self) -> str | None:
        """The upstream server's API key: upstream_api_key, else the file's, else None."""
        if self.upstream_api_key is not None:
            return self.upstream_api_key.get_secret_value()
        return None if self.upstream_api_key_file is None else _read_password(self.upstream_api_key_file)

    def effective_client_id(self) -> str:
        """The bridge's client id: stable, so that the broker keeps its session across restarts."""
        return self.client_id or f"rkmqtt-{self.effective_node_name()}"

    def effective_state_dir(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        xdg = os.environ.get("XDG_STATE_HOME")
        return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "rkmqtt"

    def effective_node_name(self) -> str:
        """The node name: the setting, else rkmqtt_<host> (and _<prefix> when the prefix is not the
        default), unique per host and prefix so that two bridges never take each other's node."""
        if self.node_name:
            return self.node_name
        host = _name_part(socket.gethostname())
        prefix = "" if self.topic_prefix == "rkmqtt" else "_" + _name_part(self.topic_prefix)
        return f"rkmqtt_{host}"[: 64 - len(prefix[:32])] + prefix[:32]

    def effective_shared_group(self) -> str:
        """The shared subscription's group."""
        return self.shared_group or shared_group_of(self.topic_prefix)[:64]

    @property
    def http_address(self) -> tuple[str, int] | None:
        """(host, port) of the HTTP API, or None when it is off."""
        return None if self.http_listen is None else parse_listen(self.http_listen)

    def http_token_names(self) -> dict[str, str]:
        """token -> client name ({} when the HTTP API takes no tokens)."""
        return {} if self.http_tokens is None else parse_tokens(self.http_tokens.get_secret_value())

    def limits(self) -> dict[str, Any]:
        return {
            "max_payload_bytes": self.max_payload_bytes,
            "max_correlation_bytes": self.max_correlation_bytes,
            "max_reply_topic_chars": self.max_reply_topic_chars,
            "max_prompt_chars": self.max_prompt_chars,
            "max_new_tokens": self.max_new_tokens,
            "max_queue": self.max_queue,
            "rate_limit": self.rate_limit,
            "rate_burst": self.rate_burst,
        }

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init_settings carries the command-line flags; the file layers are added by `load_settings`.
        extra: list[PydanticBaseSettingsSource] = list(_EXTRA_SOURCES.get(settings_cls, ()))
        return (init_settings, env_settings, *extra)


def _read_password(path: Path) -> str:
    """The password in a password file: its text without the trailing line break."""
    return path.read_text(encoding="utf-8").rstrip("\r\n")


def _name_part(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in text)


class BrokerAddress:
    """A parsed `broker` URL with credentials resolved (settings win over the URL's)."""

    def __init__(self, host: str, port: int, tls: bool, username: str | None, password: str | None) -> None:
        self.host, self.port, self.tls, self.username, self.password = host, port, tls, username, password

    @classmethod
    def parse(cls, url: str, username: str | None = None, password: SecretStr | None = None) -> BrokerAddress:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        tls = parts.scheme in ("mqtts", "ssl")
        port = parts.port or (DEFAULT_TLS_PORT if tls else DEFAULT_BROKER_PORT)
        user = username if username is not None else (unquote(parts.username) if parts.username else None)
        pw = (
            password.get_secret_value()
            if password is not None
            else (unquote(parts.password) if parts.password else None)
        )
        return cls(parts.hostname or "localhost", port, tls, user, pw)

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


class DictSource(PydanticBaseSettingsSource):
    """A settings layer from a plain mapping (the YAML file, the add-on's options.json)."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any], origin: str) -> None:
        super().__init__(settings_cls)
        self.data = data
        self.origin = origin

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if v is not None}


_EXTRA_SOURCES: dict[type[BaseSettings], tuple[PydanticBaseSettingsSource, ...]] = {}


def find_config_file(explicit: Path | None = None, folder: Path | None = None) -> Path | None:
    """The YAML file of settings a command reads: `--config`, else `RKMQTT_CONFIG`, else
    config.yaml in the current folder (`folder`) when there is one; None: no file."""
    if explicit is not None:
        return explicit
    if os.environ.get(f"{ENV_PREFIX}CONFIG"):
        return Path(os.environ[f"{ENV_PREFIX}CONFIG"])
    here = (folder or Path()) / CONFIG_FILE_NAME
    return here if here.is_file() else None


def unknown_environment(environ: dict[str, str] | None = None) -> list[str]:
    """One line for each `RKMQTT_*` variable that is not a setting (pydantic ignores them): a
    typo such as RKMQTT_N_BACH would otherwise change nothing, silently."""
    env = os.environ if environ is None else environ
    names = [f"{ENV_PREFIX}{n.upper()}" for n in Settings.model_fields]
    out = []
    for key in sorted(env):
        rest = key[len(ENV_PREFIX) :] if key.upper().startswith(ENV_PREFIX) else None
        if rest is None or rest.upper() in NOT_SETTINGS or rest.lower() in Settings.model_fields:
            continue
        out.append(f"environment variable {key} is not a setting and is ignored{did_you_mean(key, names)}")
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read it ({e.strerror}); fix the path given with --config") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}: not valid YAML{where}; fix its syntax") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must be a mapping of setting: value")
    unknown = sorted(set(map(str, data)) - set(Settings.model_fields))
    if unknown:
        hint = did_you_mean(unknown[0], Settings.model_fields)
        raise ConfigError(f"config file {path}: unknown setting {unknown[0]!r}{hint}; see config.yaml for the names")
    return {str(k): v for k, v in data.items()}


def with_model_defaults(settings: Settings, advice: Mapping[str, float]) -> Settings:
    """`settings` with the model's own value (`Engine.recommended_sampling`) for each setting of
    `MODEL_DEFAULTED` that no layer set."""
    update = {n: advice[n] for n in MODEL_DEFAULTED if n in advice and n not in settings.model_fields_set}
    return settings.model_copy(update=update) if update else settings


def load_settings(
    flags: dict[str, Any] | None = None,
    config_file: Path | None = None,
    file_layers: list[tuple[dict[str, Any], str]] | None = None,
) -> Settings:
    """Build the settings from every layer. Raises ConfigError with one line on a bad value.

    `file_layers` are extra lower layers (highest first), such as the add-on's options.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if config_file is None and os.environ.get(f"{ENV_PREFIX}CONFIG"):
        config_file = Path(os.environ[f"{ENV_PREFIX}CONFIG"])
    layers: list[tuple[dict[str, Any], str]] = []
    if config_file is not None:
        layers.append((read_yaml(config_file), f"config file {config_file}"))
    layers.extend(file_layers or [])

    sources = tuple(DictSource(Settings, data, origin) for data, origin in layers)
    _EXTRA_SOURCES[Settings] = sources
    try:
        return Settings(**flags)
    except ValidationError as e:
        raise ConfigError(_one_line(e, flags, layers)) from e
    finally:
        _EXTRA_SOURCES.pop(Settings, None)


def _one_line(exc: ValidationError, flags: dict[str, Any], layers: list[tuple[dict[str, Any], str]]) -> str:
    err = exc.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else ""
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not name:
        return f"settings: {msg}"
    value = err.get("input")
    if name in flags:
        origin = f"--{name.replace('_', '-')}"
    elif f"{ENV_PREFIX}{name.upper()}" in os.environ:
        origin = f"{ENV_PREFIX}{name.upper()}"
    else:
        origin = next((o for data, o in layers if name in data), "default")
    if err["type"] == "extra_forbidden":
        hint = did_you_mean(name, Settings.model_fields)
        return f"setting {name!r} ({origin}) is unknown{hint}; see config.yaml for the names"
    secret = name in ("password", "http_tokens", "upstream_api_key")
    shown = "***" if secret else repr(_hide_password(value) if name in ("broker", "upstream_url") else value)
    return f"setting {name}={shown} ({origin}) is not allowed: {msg}"


def _hide_password(value: Any) -> Any:
    """A broker URL with its password (if any) replaced by ***, for error messages."""
    if not isinstance(value, str) or "@" not in value:
        return value
    head, sep, rest = value.partition("://")
    userinfo, at, hostpart = (rest if sep else head).rpartition("@")
    user = userinfo.split(":", 1)[0]
    masked = f"{user}:***" if ":" in userinfo else user
    return f"{head}{sep}{masked}{at}{hostpart}" if sep else f"{masked}{at}{hostpart}"


_CLIENT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def parse_listen(text: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:port`) as (host, port); ValueError saying what is wrong."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError("must be host:port, e.g. 127.0.0.1:11434 or 0.0.0.0:11434")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address goes in brackets: [::]:11434")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("has a port that is not a number from 1 to 65535")
    return host, int(port_text)


def parse_tokens(text: str) -> dict[str, str]:
    """`name:token,name:token` as {token: name}; ValueError (without any token in it) on a bad entry."""
    out: dict[str, str] = {}
    for i, entry in enumerate(text.split(","), 1):
        name, sep, token = entry.strip().partition(":")
        if not sep or not _CLIENT_RE.fullmatch(name):
            raise ValueError(
                f"entry {i} must be name:token with a name of 1-64 characters of A-Z a-z 0-9 _ - (name:token,...)"
            )
        if len(token) < 8 or any(c.isspace() for c in token):
            raise ValueError(f"the token of {name!r} must be 8 or more characters without spaces")
        if token in out:
            raise ValueError(f"the token of {name!r} is also {out[token]!r}'s: give each name its own")
        out[token] = name
    return out
