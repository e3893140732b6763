"""Engines the node agent relays jobs to: real vLLM, or the simulator."""

from nodes.engines.base import Emission, Engine, EngineError, EngineLoad, EngineStatus
from nodes.engines.sim import SimConfig, SimEngine
from nodes.engines.vllm import VllmEngine

__all__ = [
    "Emission",
    "Engine",
    "EngineError",
    "EngineLoad",
    "EngineStatus",
    "SimConfig",
    "SimEngine",
    "VllmEngine",
]
