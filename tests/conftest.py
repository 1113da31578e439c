"""Shared fixtures. Real data and tokenizers are read from ../shared/data (never copied in)."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest
import torch

# Without a GPU, lmforge's Triton kernels are tested under Triton's interpreter (`kernel_device`).
# Triton decides between interpreting and compiling when it is first imported, so this is set
# before any test imports it; nothing else uses Triton on a CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture
def kernel_device(request) -> str:
    """Where a test runs lmforge's Triton kernels: "cuda", or "cpu" under Triton's interpreter
    (TRITON_INTERPRET=1: the kernels' own code, run with numpy), so that a machine without a GPU
    tests them too. Parametrize with `indirect=True` over KERNEL_DEVICES."""
    from lmforge.kernels import loss_kernel, optim_kernel

    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        return "cuda"
    if torch.cuda.is_available():
        pytest.skip("a GPU runs the kernels themselves (the cuda case)")
    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton, imported with TRITON_INTERPRET=1")
    for module in (loss_kernel, optim_kernel):  # made on first use: made under the interpreter
        module._kernel.cache_clear()
    return "cpu"


KERNEL_DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu), "interpreter"]


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
