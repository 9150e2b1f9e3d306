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


@pytest.fixture(scope="session")
def clip_model():
    """A ~1.7M-parameter NeuCLIP model with the real CLIP vocabulary (see tests/zero_shot_helpers.py), eval mode."""
    from zero_shot_helpers import small_model

    return small_model()


@pytest.fixture(scope="session")
def clip_processor():
    """The matching CLIPProcessor: OpenAI's tokenizer (32 tokens) and a 32 px PIL image processor."""
    from zero_shot_helpers import small_processor

    return small_processor()
