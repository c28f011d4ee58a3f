"""Device-only tests: every test under tests/gpu/ is marked `gpu` and skipped cleanly without CUDA."""

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    # Conftest hooks see the whole session's items: mark only the ones under this directory.
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture
def cuda_device() -> torch.device:
    """The current CUDA device (tests requesting it are skipped without one)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda", torch.cuda.current_device())
