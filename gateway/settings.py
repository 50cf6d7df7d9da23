"""Every knob of loragate, read from `LORAGATE_*` environment variables or a YAML file."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

DEFAULT_HOME = Path(os.path.expanduser("~/.cache/loragate"))
UPLOAD_WAIT_S = 60.0
"""How long an adapter upload, its body in, waits for one of its gateway process's turns (`upload_concurrency`)
before a 429: long, since the body was sent already."""
MIN_OPERATOR_KEY = 16
"""The shortest admin or metrics key accepted."""


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Environment beats the YAML file (`LORAGATE_CONFIG=path.yaml`), which beats the defaults."""

    model_config = SettingsConfigDict(env_prefix="LORAGATE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8080, ge=0, le=65535, description="Port the gateway listens on (0: any free one).")
    shutdown_timeout_s: int = Field(
        25,
        ge=0,
        description="How long a stopping gateway (SIGTERM, Ctrl-C) waits for the requests in flight, streams too, "
        "before it cancels them (each recorded as cancelled): within Kubernetes' 30 s grace period. Without a limit, "
        "one client that stopped reading its stream kept the gateway, and its vLLM, from ever stopping.",
    )
    keep_alive_s: int = Field(
        75,
        ge=1,
        description="How long an idle client connection stays open: longer than clients' and load balancers' own "
        "idle timeouts (httpx, under the OpenAI SDK: 5 s; AWS's ALB: 60 s), so that they close it first and never "
        "send a request on a connection the gateway is closing (a connection error the SDK retries, or not).",
    )
    workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        description="Gateway processes serving the port together (all shared state is in Redis); "
        "default: the number of cores.",
    )
    home: Path = Field(DEFAULT_HOME, description="State folder: logs, demo key, default adapter store.")
    model_cache: Path | None = Field(None, description="Where prepared base models live (default HOME/models).")
    model_dir: Path | None = Field(
        None, description="A prepared base model folder; unset means the default model, prepared on start."
    )
    quantization: Literal["none", "w4a16", "bitsandbytes"] = Field(
        "none",
        description="Base weights: bf16 (none), a 4-bit W4A16 copy, or bitsandbytes NF4 (the QLoRA base; vLLM 0.27.1).",
    )
    served_model_name: str = Field("SmolLM2-135M-Instruct", description="The base model's name in the API.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding keys and state.")
    records_redis_url: str | None = Field(
        None,
        description="Redis for the completion log and feedback (default: redis_url). Feedback is acknowledged "
        "from it only if it fsyncs first: AOF on Redis >= 7.2 (WAITAOF), or appendfsync always.",
    )
    record_completions: bool = Field(
        True, description="Write the completion log (off: nothing is recorded; feedback then finds no completion)."
    )
    guard_rails_s: float = Field(
        5.0, ge=0.01, description="How often experiments' guard rails are checked (one process a round: a lock of 90%)."
    )
    gc_threshold: int = Field(
        20_000,
        ge=700,
        description="Objects a gateway process allocates, net of those freed, before Python's collector scans its "
        "youngest ones (Python's default: 700; 20,000 used 5-19% less CPU per request at full load).",
    )
    record_workers: int = Field(
        1,
        ge=0,
        le=8,
        description="Processes that build and write a gateway process's completion records (more than 1 for a log "
        "one cannot keep up with: they share a backlog); 0: built in a thread.",
    )
    record_spool_max: int = Field(
        100_000, ge=1000, description="Completion records spooled locally while Redis is down (oldest dropped past it)."
    )
    redis_max_connections: int = Field(
        64, ge=1, description="Connections to Redis one gateway process opens at most (requests queue beyond)."
    )
    engine_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated URLs of running vLLM servers; empty means loragate starts its own.",
    )
    engine_replicas: int = Field(1, ge=1, description="vLLM servers to start when engine_urls is empty.")
    engine_python: Path | None = Field(
        None,
        description="Python that runs vLLM (default: the gateway's own); e.g. .venv-bnb/bin/python for bitsandbytes.",
    )
    engine_host: str = Field("127.0.0.1", description="Address started vLLM servers bind (loopback/private only).")
    engine_port: int = Field(
        8100, ge=1, le=65535, description="Port of the first started vLLM server; replicas count up."
    )
    engine_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="vLLM's compute dtype (--dtype); auto: float32 on CPUs without native bf16 (AVX2-only), "
        "where bf16 is emulated and slow; vLLM's own choice elsewhere.",
    )
    engine_kv_cache_gib: int = Field(2, ge=1, description="KV cache of each started vLLM server (CPU), GiB.")
    engine_start_timeout_s: float = Field(
        600.0, gt=0, description="How long a started vLLM may take to become healthy."
    )
    engine_extra_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Extra vLLM command-line arguments, comma-separated."
    )
    engine_tool_parser: str | None = Field(
        "hermes", description="vLLM tool-call parser (enables tools and tool_choice); empty to disable."
    )
    max_loras: int = Field(
        16,
        ge=1,
        description="Distinct adapters in one vLLM batch (--max-loras); below the working set, mixed traffic slows.",
    )
    max_cpu_loras: int = Field(32, ge=1, description="Adapters held by each vLLM replica (--max-cpu-loras).")
    max_lora_rank: int = Field(16, ge=1, description="Largest adapter rank vLLM accepts (--max-lora-rank).")
    adapter_store: Path | None = Field(None, description="Adapter store folder (default HOME/adapters).")
    spool_dir: Path | None = Field(
        None,
        description="Where records and feedback wait while Redis is down (default HOME/spool): a disk that outlives"
        " the process; several processes may share it where `flock` holds between them.",
    )
    hot_adapters: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Adapters kept loaded on every replica, never evicted (comma-separated)."
    )
    max_adapter_upload_bytes: int = Field(
        1 << 30, description="Largest adapter archive POST /admin/tenants/T/adapters accepts."
    )
    upload_concurrency: int = Field(
        2,
        ge=1,
        description="Adapter uploads one gateway process stores at once, once received (unpacking, validating and "
        f"hashing take worker threads serving needs too); one more waits {UPLOAD_WAIT_S:g} s for a turn, then 429.",
    )
    upload_idle_timeout_s: float = Field(
        60.0, gt=0, description="Longest an adapter upload's body may pause (408 after): its scratch copy is removed."
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above).")
    max_tokens_cap: int = Field(
        2048,
        ge=1,
        description="Most tokens one request may generate: a chat request naming no max_tokens gets this (a "
        "text completion 16), one asking for more is lowered to it, so no request holds an engine for minutes.",
    )
    isolate_prefix_cache: bool = Field(
        True,
        description="Each tenant's requests reuse only its own prefix-cache blocks in vLLM (a per-tenant "
        "cache_salt), so no tenant can time another's prompts; false lets tenants share common prefixes.",
    )
    allow_prompt_logprobs: bool = Field(
        False,
        description="Serve requests that make vLLM compute prompt logprobs (`prompt_logprobs`, `echo` on chat, "
        "`echo` with `logprobs` on text completions). Off: refused (400): with LoRA on, vLLM 0.32's engine stops "
        "when it computes them in a batch with a request of n > 1 (vLLM issue 16668), whoever sent either. Turn on "
        "only for engines known to be free of that.",
    )
    upstream_timeout_s: float = Field(600.0, gt=0, description="Longest silence from vLLM during one request.")
    health_interval_s: float = Field(
        2.0, ge=0.05, description="How often vLLM replicas are health-checked (0.05 s at least: 0 spun the checks)."
    )
    auth_cache_s: float = Field(
        5.0, ge=0, description="Longest a verified API key is trusted without asking Redis again (changes show sooner)."
    )
    state_poll_s: float = Field(
        0.25, gt=0, description="How often each gateway checks Redis for changed tenants, keys, pins and aliases."
    )
    quota_reserve_tokens: int | None = Field(
        None,
        ge=1,
        description="Completion tokens a chat request naming no max_tokens reserves against a tokens-per-minute "
        "quota (default: the cap, LORAGATE_MAX_TOKENS_CAP, the most it may generate; fewer lets more of them start at "
        "once, and a burst of them then use more than the limit until their usage is settled).",
    )
    quota_lease_requests: int = Field(
        256,
        ge=0,
        le=1000,
        description="The most requests' room a quota check may take ahead for this process (leases start at 16 and "
        "double while they are used up within their second; 0: check every request in Redis).",
    )
    admin_key: SecretStr | None = Field(None, description="Key for /admin routes; unset disables them.")
    metrics_key: SecretStr | None = Field(
        None,
        description="Key for the operator endpoints (/metrics, /readyz?verbose=1); the admin key opens them too.",
    )
    metrics_max_tenants: int = Field(
        100,
        ge=1,
        description="Tenants with a label of their own on /metrics, the first seen by each process; the rest: `other`.",
    )
    metrics_max_names: int = Field(
        10,
        ge=1,
        description="A tenant's models (with their adapter and arm) with labels of their own on /metrics, the first "
        "seen by each process; the rest: `other` (a manage key makes aliases and adapters without bound).",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Gateway log level (uvicorn's names; `warn` is refused, as uvicorn refuses it)."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, level: Any) -> Any:
        return level.strip().lower() if isinstance(level, str) else level

    @model_validator(mode="after")
    def _ports_exist(self) -> Settings:
        if self.engine_port + self.engine_replicas - 1 > 65535:
            raise ValueError(f"engine_port {self.engine_port} with {self.engine_replicas} replicas passes port 65535")
        return self

    @field_validator("engine_urls", "engine_extra_args", "hot_adapters", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("spool_dir", mode="before")
    @classmethod
    def _unset_if_empty(cls, value: Any) -> Any:
        """`LORAGATE_SPOOL_DIR=` is unset (the default), not the working directory."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("admin_key", "metrics_key", mode="before")
    @classmethod
    def _operator_key(cls, value: Any) -> Any:
        """Without the spaces around it (a secret read from a file ends with a newline, which no header can
        carry: the operator was locked out, with nothing said); empty is unset. One that cannot be sent as a
        Bearer token, or is short enough to guess, is refused at start."""
        key = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(key, str):
            return value
        key = key.strip()
        if not key:
            return None
        if not (key.isascii() and key.isprintable()) or any(char.isspace() for char in key):
            raise ValueError("must be printable ASCII without spaces: it is sent as a Bearer token")
        if len(key) < MIN_OPERATOR_KEY:
            raise ValueError(f"has {len(key)} characters; use at least {MIN_OPERATOR_KEY} (`openssl rand -hex 24`)")
        return key

    @field_validator("engine_python")
    @classmethod
    def _absolute(cls, python: Path | None) -> Path | None:
        """Absolute, so the engine starts the same from any folder; not resolved: a venv's python is a symlink."""
        return python.expanduser().absolute() if python else None

    @field_validator("engine_urls")
    @classmethod
    def _strip_slash(cls, urls: list[str]) -> list[str]:
        return [url.rstrip("/") for url in urls]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("LORAGATE_CONFIG")
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    @cached_property
    def models_root(self) -> Path:
        return self.model_cache or self.home / "models"

    @cached_property
    def spool_root(self) -> Path:
        """Local spools of records and feedback waiting for Redis: keep it on a disk that outlives the process."""
        return self.spool_dir or self.home / "spool"

    @cached_property
    def adapter_root(self) -> Path:
        return self.adapter_store or self.home / "adapters"

    @cached_property
    def training_root(self) -> Path:
        """Retraining runs, a folder per tenant (their datasets are copies of the tenant's completion log)."""
        return self.home / "training"
