"""The steady-step check (hf_memopt.engine.snapshot): both implementations, the C++ one and the Python one,
held to the same cases. After each user action between two steps, the snapshot must not hold (the step then
takes the full path: torch's _init_group, the state guard), and the step must equal the "torch" executor's
(the reference, which never takes the steady path). With nothing changed but the gradients it must hold.
"""

from __future__ import annotations

import pytest
import torch

import hf_memopt
from hf_memopt.engine import snapshot
from tests.executors_available import require_or_skip


def _model(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (5,), (4, 3), (7,), (3, 3)]
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def _grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * (1 + step % 3)


def _pair(executor: str):
    """The same model and optimizer twice: one on ``executor`` (steady steps), one on "torch" (the reference)."""
    out = []
    for name in (executor, "torch"):
        params = _model()
        opt = hf_memopt.MemoryAugmentedAdamW(params, lr=1e-2, topc=2, weight_decay=0.1, executor=name)
        out.append((params, opt))
    return out


def _state_param(opt, j):
    return opt.param_groups[0]["params"][j]


# each action: f(params, opt) done between two steps on both optimizers; True when the step must raise
ACTIONS = {
    "data swapped (same values)": lambda ps, o: setattr(ps[0], "data", ps[0].data.clone()),
    "exp_avg replaced": lambda ps, o: o.state[ps[1]].__setitem__("exp_avg", o.state[ps[1]]["exp_avg"].clone()),
    "slot storage swapped": lambda ps, o: setattr(
        o.state[ps[2]]["memory_1"], "data", o.state[ps[2]]["memory_1"].data.clone()
    ),
    "memory_sum narrowed in place": lambda ps, o: setattr(
        o.state[ps[1]]["memory_sum"], "data", o.state[ps[1]]["memory_sum"].data[:2]
    ),
    "state dict replaced": lambda ps, o: o.state.__setitem__(ps[3], dict(o.state[ps[3]])),
    "step counter replaced": lambda ps, o: o.state[ps[0]].__setitem__("step", o.state[ps[0]]["step"].clone()),
    "step counter edited": lambda ps, o: o.state[ps[0]]["step"].fill_(1.0),
    "slot values edited": lambda ps, o: o.state[ps[1]]["memory_0"].mul_(0.5),
    "a gradient missing": lambda ps, o: setattr(ps[2], "grad", None),
    "a gradient not contiguous": lambda ps, o: setattr(ps[0], "grad", ps[0].grad.t().contiguous().t()),
    "maximize edited": lambda ps, o: o.param_groups[0].__setitem__("maximize", True),
    "params reordered": lambda ps, o: o.param_groups[0].__setitem__("params", [ps[1], ps[0], *ps[2:]]),
    # the same storage, pointer and size, another object (read transposed): only identity tells
    "exp_avg replaced by its own transpose": lambda ps, o: o.state[ps[4]].__setitem__(
        "exp_avg", o.state[ps[4]]["exp_avg"].t()
    ),
    "priority_0 storage swapped": lambda ps, o: setattr(
        o.state[ps[0]]["priority_0"], "data", o.state[ps[0]]["priority_0"].data.clone()
    ),
    "load_state_dict": lambda ps, o: o.load_state_dict(o.state_dict()),
    # the ledger's scalars are the truth: one given new storage or replaced, with a new value, is read back
    "memory_clock storage swapped": lambda ps, o: setattr(
        o.state[ps[1]]["memory_clock"], "data", o.state[ps[1]]["memory_clock"].data + 100
    ),
    "priority_1 replaced": lambda ps, o: o.state[ps[2]].__setitem__("priority_1", o.state[ps[2]]["priority_1"] * 1e3),
    "stored_at_1 storage swapped": lambda ps, o: setattr(
        o.state[ps[0]]["stored_at_1"], "data", o.state[ps[0]]["stored_at_1"].data.clone()
    ),
}
RAISES = {"memory_sum narrowed in place"}
#: values edited in place: nothing structural changed (the snapshot may hold), the step must still match torch
VALUE_EDITS = {"step counter edited", "slot values edited"}
#: refused by a forced fast executor (ValueError naming why); "auto" falls back to "torch" for the step
REFUSED_WHEN_FORCED = {"a gradient not contiguous"}
LEDGER_KEYS = ("priority_0", "priority_1", "stored_at_0", "stored_at_1", "memory_count", "memory_clock")
#: the fast executor's name per executor argument
RUNS = {"auto": "cpu", "triton": "triton"}


@pytest.mark.parametrize("executor", ["cpu"])
def test_holds_only_when_nothing_changed(checker, executor):
    require_or_skip(executor)
    (params, opt), _ = _pair(executor)
    for step in range(3):
        _grads(params, step)
        opt.step()
    snap = opt._engine.cache.get(("snapshot", 0, executor))
    assert snap is not None
    _grads(params, 3)
    fresh = snap.holds(opt, opt.param_groups[0])
    assert fresh is not None
    grads, ptrs = fresh
    assert all(g is p.grad for g, p in zip(grads, params))
    assert list(ptrs) == [p.grad.data_ptr() for p in params]


@pytest.mark.parametrize("action", sorted(ACTIONS))
@pytest.mark.parametrize("executor", ["auto", "triton"])
def test_action_breaks_the_snapshot_and_the_step_matches_torch(checker, executor, action):
    require_or_skip(RUNS[executor])
    (params, opt), (ref_params, ref) = _pair(executor)
    for step in range(3):
        for ps, o in ((params, opt), (ref_params, ref)):
            _grads(ps, step)
            o.step()
    snap = opt._engine.cache.get(("snapshot", 0, executor))
    assert snap is not None, "the fast executor's group left no snapshot"
    for ps, o in ((params, opt), (ref_params, ref)):
        _grads(ps, 3)
        ACTIONS[action](ps, o)
    if action not in VALUE_EDITS:
        assert snap.holds(opt, opt.param_groups[0]) is None, f"the snapshot still holds after: {action}"
    if action in RAISES:
        for o in (opt, ref):
            with pytest.raises(RuntimeError, match="shape"):
                o.step()
        return
    if action in REFUSED_WHEN_FORCED and executor != "auto":
        with pytest.raises(ValueError, match="contiguous"):
            opt.step()
        return
    for step in range(4, 7):  # the action's step, then steady steps again
        for ps, o in ((params, opt), (ref_params, ref)):
            o.step()
            _grads(ps, step)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    for p, q in zip(params, ref_params):
        for key in ("memory_0", "memory_1", "memory_sum", "exp_avg", "exp_avg_sq", "step", *LEDGER_KEYS):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=0, atol=1e-6)


def test_step_counters_pooled_stay_torchs_values():
    """On "triton" the step counters become views of one tensor (one add per step): each still reads as a
    0-dim fp32 CPU tensor with the count torch's AdamW keeps, and a state_dict round trip keeps them."""
    require_or_skip("triton")
    params = _model()
    opt = hf_memopt.MemoryAugmentedAdamW(params, lr=1e-2, topc=2, executor="triton")
    torch_params = _model()
    torch_opt = torch.optim.AdamW(torch_params, lr=1e-2)
    for step in range(4):
        _grads(params, step)
        _grads(torch_params, step)
        opt.step()
        torch_opt.step()
    steps = [opt.state[p]["step"] for p in params]
    assert snapshot.st.pooled_steps(steps) is not None
    for p, q in zip(params, torch_params):
        s, t = opt.state[p]["step"], torch_opt.state[q]["step"]
        assert (s.dtype, s.device, s.dim()) == (t.dtype, t.device, t.dim()) and float(s) == float(t) == 4.0
    saved = opt.state_dict()
    fresh = hf_memopt.MemoryAugmentedAdamW(_model(), lr=1e-2, topc=2, executor="triton")
    fresh.load_state_dict(saved)
    assert [float(fresh.state[p]["step"]) for p in fresh.param_groups[0]["params"]] == [4.0] * len(params)
