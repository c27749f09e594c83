import os
from pathlib import Path

import pytest

from dlplora.testing import tiny_examples, tiny_model_dir, write_prepared


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama with a ChatML tokenizer (built here, no download)."""
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Prepared data for two tiny tasks: 'quiz' (multiple choice) and 'sums' (generative)."""
    d = tmp_path_factory.mktemp("data")
    write_prepared(d, "quiz", tiny_examples("quiz", 24, "mcq"), tiny_examples("quiz", 6, "mcq", seed=1))
    write_prepared(d, "sums", tiny_examples("sums", 24, "qa"), tiny_examples("sums", 6, "qa", seed=1))
    return d


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, request):
    """Unit tests get an empty cache; integration tests use the real one (the converted backbone, BIG-bench files)."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("DLP_LORA_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def extra_data_dir():
    d = os.environ.get("DLP_LORA_EXTRA_DATA")
    return Path(d) if d and Path(d).is_dir() else None
