import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Nothing is downloaded by the test suite: bench.metrics never fetches the Inception weights (subprocesses inherit it).
os.environ["BENCH_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: more than one torch thread per worker oversubscribes them
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

NO_CUDA = "no CUDA device: torch.cuda.is_available() is False"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA (``make test-gpu`` runs them): without it each is skipped with the reason."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture(scope="session")
def metric_cache(tmp_path_factory):
    """One ``cache_dir`` for the session's metric classifiers and reference features: their files are keyed by the
    dataset and recipe, so tests share them safely, and each is trained once per worker instead of once per test."""
    return tmp_path_factory.mktemp("metric-cache")
