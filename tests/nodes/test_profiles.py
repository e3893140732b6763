"""Serving profiles: refused early with a one-line reason, or turned into an exact launch plan."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nodes.profiles import (
    LatencyWindow,
    ProfileError,
    Slo,
    launch_plan,
    load_profile,
    model_context_length,
    p90,
    parse_profile,
    replan_split,
)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "llama-8b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    return directory


def yaml_profile(model_dir: Path, **overrides: object) -> str:
    fields: dict[str, object] = {"model": str(model_dir), "served_model_name": "llama-3-8b", "port": 8100}
    fields.update(overrides)
    return "\n".join(f"{k}: {json.dumps(v)}" for k, v in fields.items())


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_unified_plan_is_one_vllm_with_a_token_budget(model_dir: Path) -> None:
    profile = parse_profile(
        yaml_profile(
            model_dir,
            max_model_len=4096,
            max_num_seqs=64,
            max_num_batched_tokens=2048,
            dtype="float32",
            enforce_eager=True,
        )
    )
    plan = launch_plan(profile)
    assert plan.mode == "unified"
    assert len(plan.processes) == 1
    proc = plan.processes[0]
    assert proc.argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert option(proc.argv, "--model") == str(model_dir)
    assert option(proc.argv, "--served-model-name") == "llama-3-8b"
    assert option(proc.argv, "--dtype") == "float32"
    assert option(proc.argv, "--max-model-len") == "4096"
    assert option(proc.argv, "--max-num-seqs") == "64"
    assert option(proc.argv, "--max-num-batched-tokens") == "2048"
    assert option(proc.argv, "--port") == "8100"
    assert option(proc.argv, "--host") == "127.0.0.1"
    assert "--enforce-eager" in proc.argv
    assert "--enable-prefix-caching" in proc.argv
    assert "--kv-transfer-config" not in proc.argv
    assert proc.env == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert plan.engine_url == "http://127.0.0.1:8100"
    info = profile.info()
    assert (info.mode, info.prefill_share, info.decode_share, info.max_num_seqs) == ("unified", 100, 100, 64)
    assert profile.marketplace_models == ["llama-3-8b"]


def test_semi_pd_plan_splits_one_gpu_under_mps(model_dir: Path) -> None:
    profile = parse_profile(
        yaml_profile(
            model_dir,
            mode="semi-pd",
            prefill_share=80,
            decode_share=100,
            gpu_memory_utilization=0.9,
            cpu_kvcache_space_gib=None,
        )
    )
    plan = launch_plan(profile)
    daemon, prefill, decode = plan.processes
    assert daemon.argv == ["nvidia-cuda-mps-control", "-d"]
    assert daemon.daemon
    assert daemon.stop_input == "quit\n"
    assert daemon.env["CUDA_MPS_ENABLE_PER_CTX_DEVICE_MULTIPROCESSOR_PARTITIONING"] == "1"
    assert [p.role for p in plan.servers] == ["prefill", "decode"]
    assert prefill.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "80"
    assert decode.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "100"
    for proc in (prefill, decode):
        assert proc.env["CUDA_VISIBLE_DEVICES"] == "0"  # one GPU
        assert proc.env["CUDA_MPS_PIPE_DIRECTORY"] == daemon.env["CUDA_MPS_PIPE_DIRECTORY"]
        assert option(proc.argv, "--gpu-memory-utilization") == "0.45"  # two instances share the budget
        assert "VLLM_CPU_KVCACHE_SPACE" not in proc.env
    assert json.loads(option(prefill.argv, "--kv-transfer-config")) == {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_producer",
        "kv_buffer_device": "cuda",
    }
    assert json.loads(option(decode.argv, "--kv-transfer-config"))["kv_role"] == "kv_consumer"
    assert prefill.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] != decode.env["VLLM_NIXL_SIDE_CHANNEL_PORT"]
    assert (plan.prefill_url, plan.decode_url) == ("http://127.0.0.1:8100", "http://127.0.0.1:8101")
    info = profile.info()
    assert (info.mode, info.prefill_share, info.decode_share) == ("semi-pd", 80, 100)


def test_disaggregated_plan_uses_two_gpus(model_dir: Path) -> None:
    plan = launch_plan(
        parse_profile(yaml_profile(model_dir, mode="disaggregated", prefill_device="0", decode_device="1"))
    )
    assert [p.role for p in plan.processes] == ["prefill", "decode"]  # no MPS daemon
    prefill, decode = plan.processes
    assert (prefill.env["CUDA_VISIBLE_DEVICES"], decode.env["CUDA_VISIBLE_DEVICES"]) == ("0", "1")
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in prefill.env
    assert option(prefill.argv, "--gpu-memory-utilization") == "0.9"
    assert json.loads(option(decode.argv, "--kv-transfer-config"))["kv_role"] == "kv_consumer"


def test_stream_interval_reaches_vllm_only_when_set(model_dir: Path) -> None:
    assert "--stream-interval" not in launch_plan(parse_profile(yaml_profile(model_dir))).processes[0].argv
    argv = launch_plan(parse_profile(yaml_profile(model_dir, stream_interval=4))).processes[0].argv
    assert argv[argv.index("--stream-interval") + 1] == "4"


def test_a_tool_call_parser_enables_tools_in_vllm_and_in_heartbeats(model_dir: Path) -> None:
    plain = parse_profile(yaml_profile(model_dir))
    assert "--tool-call-parser" not in launch_plan(plain).processes[0].argv
    assert not plain.info().tools
    hermes = parse_profile(yaml_profile(model_dir, tool_call_parser="hermes"))
    argv = launch_plan(hermes).processes[0].argv
    assert option(argv, "--tool-call-parser") == "hermes"
    assert "--enable-auto-tool-choice" in argv
    assert hermes.info().tools


def test_port_zero_picks_free_ports(model_dir: Path) -> None:
    plan = launch_plan(parse_profile(yaml_profile(model_dir, port=0)))
    assert plan.processes[0].port not in (None, 0)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"mode": "semi-pd", "prefill_share": 0}, "prefill_share must be between 1 and 100"),
        ({"mode": "semi-pd", "decode_share": 120}, "decode_share must be between 1 and 100"),
        ({"gpu_memory_utilization": 1.2}, "gpu_memory_utilization must be in (0, 1.0]"),
        ({"mode": "pipelined"}, "mode"),
        ({"max_model_len": 16384}, "max_model_len 16384 exceeds the model's context of 8192 tokens"),
        ({"max_num_seqs": 0}, "max_num_seqs must be at least 1"),
        ({"mode": "disaggregated", "decode_device": "0"}, "prefill_device and decode_device to differ"),
        ({"max_num_sequences": 8}, "max_num_sequences"),
        ({"stream_interval": 0}, "stream_interval must be between 1 and 64 tokens"),
        ({"busy_stream_interval": 100}, "busy_stream_interval must be between 1 and 64 tokens"),
        ({"max_num_seqs": 256, "max_num_batched_tokens": 128}, "must be at least max_num_seqs"),
        ({"max_model_len": 1024, "long_prefill_token_threshold": 4096}, "long_prefill_token_threshold must be"),
        ({"long_prefill_token_threshold": -5}, "long_prefill_token_threshold must be"),
        ({"kv_connector": {"side_channel_port": 70000}}, "side_channel_port must be between"),
        ({"accelerator_count": 0}, "accelerator_count must be at least 1"),
        ({"accelerator_memory_gib": -3}, "must not be negative"),
        ({"models": [""]}, "empty name"),
        ({"python": "/nonexistent/python"}, "is not a file"),
    ],
)
def test_invalid_profiles_are_refused_with_one_line(model_dir: Path, overrides: dict[str, object], reason: str) -> None:
    with pytest.raises(ProfileError) as exc:
        parse_profile(yaml_profile(model_dir, **overrides))
    assert reason in str(exc.value)
    assert "\n" not in str(exc.value)


def test_a_config_json_that_is_not_an_object_is_read_as_stating_no_context(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[]")
    assert model_context_length(tmp_path) is None
    parse_profile(yaml_profile(tmp_path))  # refused or accepted with a reason, never a traceback


def test_missing_model_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"has no config\.json"):
        parse_profile(yaml_profile(tmp_path / "nowhere"))


def test_profile_files_in_yaml_and_json(model_dir: Path, tmp_path: Path) -> None:
    as_yaml = tmp_path / "node.yaml"
    as_yaml.write_text(yaml_profile(model_dir, mode="semi-pd", prefill_share=90, slo={"ttft_ms": 300}))
    as_json = tmp_path / "node.json"
    as_json.write_text(json.dumps({"model": str(model_dir), "served_model_name": "m", "models": ["llama-3-8b"]}))
    from_yaml = load_profile(as_yaml)
    assert (from_yaml.prefill_share, from_yaml.slo.ttft_ms, from_yaml.slo.tpot_ms) == (90, 300, 100)
    assert load_profile(as_json).marketplace_models == ["llama-3-8b"]
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(tmp_path / "absent.yaml")


def test_replan_moves_towards_the_missed_slo_in_small_steps() -> None:
    slo = Slo(ttft_ms=500, tpot_ms=100)
    assert replan_split(80, 100, ttft_p90_ms=520, tpot_p90_ms=50, slo=slo) == (82, 100)  # 4% over: one step
    assert replan_split(80, 100, ttft_p90_ms=2000, tpot_p90_ms=50, slo=slo) == (86, 100)  # at most 3 steps
    assert replan_split(98, 100, ttft_p90_ms=2000, tpot_p90_ms=50, slo=slo) == (100, 96)  # then take from decode
    assert replan_split(100, 80, ttft_p90_ms=2000, tpot_p90_ms=50, slo=slo) == (100, 80)  # never below 80
    assert replan_split(90, 90, ttft_p90_ms=100, tpot_p90_ms=115, slo=slo) == (90, 94)  # decode missing
    assert replan_split(90, 90, ttft_p90_ms=900, tpot_p90_ms=200, slo=slo) == (90, 90)  # both: overload, not split
    assert replan_split(90, 90, ttft_p90_ms=100, tpot_p90_ms=20, slo=slo) == (90, 90)  # both met


def test_latency_window_keeps_the_last_400() -> None:
    window = LatencyWindow()
    for i in range(1000):
        window.add(float(i), 1.0)
    assert window.full
    assert len(window.ttft_ms) == 400
    assert p90(window.ttft_ms) == 959.0  # over 600..999
    assert p90([]) == 0.0
