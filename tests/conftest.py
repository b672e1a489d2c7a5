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


@pytest.fixture(params=["native", "python"])
def checker(request, monkeypatch):
    """Each implementation of the identity rule (hf_memopt.engine.identity) in turn: the C++ one (required
    where CI requires "guard") and the Python one."""
    from hf_memopt.engine import native_guard
    from tests.executors_available import require_or_skip

    if request.param == "native":
        require_or_skip("guard")
        module = native_guard.load()
        assert module is not None
        monkeypatch.setattr(native_guard, "load", lambda: module)
    else:
        monkeypatch.setattr(native_guard, "load", lambda: None)
    return request.param
