import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gguf_factory import write_tiny_gemma3, write_tiny_llama  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_llama")
    return write_tiny_llama(d / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_gemma3_path(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_gemma3")
    return write_tiny_gemma3(d / "tiny-gemma3.gguf")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_path):
    from jisu import LLM
    return LLM(str(tiny_llama_path), progress=False)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from jisu.registry import pull
    return pull("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    from jisu.registry import pull
    return pull("gemma3-270m", progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from jisu import LLM
    return LLM(str(smollm2_path), progress=False)


@pytest.fixture(scope="session")
def gemma3(gemma3_path):
    from jisu import LLM
    return LLM(str(gemma3_path), progress=False)


@pytest.fixture(params=["smollm2", "gemma3"])
def real_llm(request):
    return request.getfixturevalue(request.param)
