"""Shared test setup: offline Hub, a throwaway HF_HOME, and tiny models that build in milliseconds."""

import os
import tempfile

# Set before transformers / huggingface_hub are imported anywhere: nothing may reach a hub during tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="neuclip-test-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def tmp_hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return tmp_path / "hf_home"
