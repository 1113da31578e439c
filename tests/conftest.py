"""Shared fixtures. Real data and tokenizers are read from ../shared/data (never copied in)."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("LMFORGE_SHARED_DATA", ROOT.parent / "shared" / "data"))
QWEN_TOKENIZER = SHARED_DATA / "tokenizers" / "qwen2.5-0.5b-instruct"
DUMMY_CONVERSATIONS = SHARED_DATA / "fastchat_dummy_conversation.json"
ALPACA_DEMO = SHARED_DATA / "llama_factory" / "alpaca_en_demo.json"
KTO_DEMO = SHARED_DATA / "llama_factory" / "kto_en_demo.json"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped on a machine without CUDA (pick them with `-m gpu`; leave out
    the end-to-end runs with `-m "not e2e"`)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own token cache, so tests never see each other's entries."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "lmforge-cache"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    if not QWEN_TOKENIZER.is_dir():
        pytest.fail(f"test data missing: {QWEN_TOKENIZER}")
    return AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))


@pytest.fixture
def fresh_qwen_tokenizer():
    """A tokenizer a test may modify (resolve_template installs templates on it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))
