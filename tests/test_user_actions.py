"""Random sequences of what users do between steps, on every executor beside the "torch" executor.

A seeded generator draws sequences of actions: steps (with gradients that are missing, zero or hold an
inf), checkpoints loaded into a fresh optimizer, ``param_groups`` edits, ``.data`` swaps of parameters
and state tensors, state entries replaced, parameters added, and switches of the executor. Each
sequence runs twice on the same inputs: once with the executor under test (which keeps raw addresses
between steps) and once with the "torch" executor (which keeps none). After every action the
parameters and the memory must agree (to the last bits the executors' arithmetic differs in), and
nothing may crash. ``HF_MEMOPT_ACTION_SEQUENCES`` sets how many sequences (default 60 per executor;
the "triton" rows run a third of them, the interpreter being slow).
"""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch
from executors_available import needs, wanted

import hf_memopt
from hf_memopt.engine.state import is_memory_key

SEQUENCES = int(os.environ.get("HF_MEMOPT_ACTION_SEQUENCES", "60"))
ACTIONS_PER_SEQUENCE = 10
SHAPES = [(6, 4), (5,), (3, 2, 2)]
KW = dict(lr=1e-2, topc=3, decay=0.8, weight_decay=0.05)

pytestmark = pytest.mark.filterwarnings(
    "ignore::RuntimeWarning:triton.runtime.interpreter", "ignore:the loaded optimizer state has no"
)


class _Run:
    """One optimizer over its own parameters, driven by the sequence."""

    def __init__(self, params, executor, cls):
        self.params, self.cls = params, cls
        self.opt = cls(params, executor=executor, **KW)

    def set_grads(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else g.clone()


def _grads(rng, params):
    out = []
    for p in params:
        r = rng.random()
        if r < 0.15:
            out.append(None)
        elif r < 0.2:
            out.append(torch.zeros_like(p))
        else:
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
            g *= 10 ** rng.uniform(-3, 1)
            if rng.random() < 0.03:
                g.view(-1)[0] = float("inf")
            out.append(g)
    return out


def _act(rng, runs, executors):
    """Draw one action and do it to every run alike (the executor switch to the first run only)."""
    action = rng.choice(["step"] * 6 + ["load", "edit", "swap_param", "swap_state", "replace", "add", "switch"])
    params = runs[0].params
    if action == "step":
        grads = _grads(rng, params)
        for run in runs:
            run.set_grads(grads)
            run.opt.step()
    elif action == "load":
        for run in runs:
            saved = copy.deepcopy(run.opt.state_dict())
            fresh = run.cls(run.params if len(run.opt.param_groups) == 1 else run.params[:3], **KW)
            for g in run.opt.param_groups[1:]:
                fresh.add_param_group({"params": g["params"], "topc": g["topc"]})
            fresh.executor = run.opt.executor
            fresh.load_state_dict(saved)
            run.opt = fresh
    elif action == "edit":
        key, value = rng.choice(
            [("lr", 3e-3), ("maximize", True), ("maximize", False), ("weight_decay", 0.0), ("betas", (0.8, 0.95))]
        )
        gi = rng.randrange(len(runs[0].opt.param_groups))
        for run in runs:
            run.opt.param_groups[gi][key] = value
    elif action == "swap_param":
        i = rng.randrange(len(params))
        for run in runs:
            run.params[i].data = run.params[i].data.clone()
    elif action in ("swap_state", "replace"):
        i = rng.randrange(len(params))
        keys = sorted(k for k, v in runs[0].opt.state.get(params[i], {}).items() if torch.is_tensor(v))
        if not keys:
            return action
        key = rng.choice(keys)
        for run in runs:
            state = run.opt.state[run.params[i]]
            if action == "swap_state":
                state[key].data = state[key].data.clone()
            else:
                state[key] = state[key].clone()  # a new tensor object in the state (the ledger's scalars too)
    elif action == "add":
        if len(runs[0].opt.param_groups) == 1:
            new = torch.randn(4, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
            for run in runs:
                p = new.clone().requires_grad_()
                run.params.append(p)
                run.opt.add_param_group({"params": [p], "topc": 2})
    elif action == "switch":
        runs[0].opt.executor = rng.choice(executors)
    return action


def _compare(a, b, where):
    for p, q in zip(a.params, b.params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, equal_nan=True, msg=where)
    for p, q in zip(a.params, b.params):
        sa, sb = a.opt.state.get(p, {}), b.opt.state.get(q, {})
        keys = [k for k in sa if is_memory_key(k)]
        assert keys == [k for k in sb if is_memory_key(k)], where
        for k in keys:
            torch.testing.assert_close(
                sa[k].float(), sb[k].float(), rtol=1e-5, atol=1e-6, equal_nan=True, msg=f"{where}: {k}"
            )


def _executors_here():
    return ["torch", "auto"] + [e for e in ("cpu", "triton") if wanted(e)]


@pytest.mark.parametrize(
    "executor", [pytest.param("cpu", marks=needs("cpu")), pytest.param("triton", marks=needs("triton")), "auto"]
)
@pytest.mark.parametrize("optimizer", ["adamw", "cm"])
def test_random_user_actions_match_the_torch_executor(executor, optimizer):
    cls = hf_memopt.MemoryAugmentedAdamW if optimizer == "adamw" else hf_memopt.CriticalMomentaAdamW
    n = SEQUENCES // 3 if executor == "triton" else SEQUENCES
    for seq in range(n):
        rng = random.Random(f"{executor}-{optimizer}-{seq}")
        gen = torch.Generator().manual_seed(seq)
        init = [torch.randn(s, generator=gen) for s in SHAPES]
        runs = [
            _Run([t.clone().requires_grad_() for t in init], executor, cls),
            _Run([t.clone().requires_grad_() for t in init], "torch", cls),
        ]
        done = []
        for _ in range(ACTIONS_PER_SEQUENCE):
            try:
                done.append(_act(rng, runs, [executor, "torch"]))
            except ValueError as err:
                # the one refusal a sequence may meet: a forced fast executor on a state it cannot read
                assert "cannot run param group" in str(err), err
                done.append("refused")
                runs[0].opt.executor = "torch"
                continue
            _compare(*runs, f"sequence {seq}, after {done}")
