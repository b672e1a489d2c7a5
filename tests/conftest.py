import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the "triton" executor runs its kernels under Triton's interpreter, on CPU tensors
# (SPEC section 8). It must be set before the kernels are first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "executor(*names): runs the 'cpu' or 'triton' executor; skipped where it cannot run, failed where "
        "$HF_MEMOPT_REQUIRE_EXECUTORS names it (tests/executors_available.py)",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    from executors_available import require_or_skip  # imports hf_memopt: after the environment above

    for mark in item.iter_markers("executor"):
        for name in mark.args:
            require_or_skip(name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
