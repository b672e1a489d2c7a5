"""What a user does to tensors between steps, on every executor: each row of issue 20's table.

torch's own optimizers survive these actions (or raise a ``RuntimeError``). The "cpu" and "triton"
executors keep raw addresses between steps; here each of them, and "auto", must either continue
exactly as an undisturbed run (or the "torch" executor) does, or raise what torch raises, naming the
parameter and the key, before anything is written. The C kernel's rows also run under
AddressSanitizer in CI (``tests/sanitize``), where a stale address is a report, not luck.
"""

from __future__ import annotations

import copy

import pytest
import torch
from executors_available import needs
from streams import clone_params, gradient_stream, make_params, set_grads

import hf_memopt
from hf_memopt.engine.state import is_memory_key

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

EXECUTORS = [
    "torch",
    pytest.param("auto", marks=needs("cpu")),
    pytest.param("cpu", marks=needs("cpu")),
    pytest.param("triton", marks=needs("triton")),
]
FAST = [pytest.param("cpu", marks=needs("cpu")), pytest.param("triton", marks=needs("triton"))]


def _opt(params, executor, **kw):
    kw = {"lr": 1e-2, "topc": 3, "decay": 0.8, "weight_decay": 0.1, **kw}
    return hf_memopt.MemoryAugmentedAdamW(params, executor=executor, **kw)


def _run(opt, params, grads_list):
    for grads in grads_list:
        set_grads(params, grads)
        opt.step()


def _snapshot(opt, params):
    """Copies of every parameter and every state tensor (the memory's scalars included)."""
    out = {("p", i): p.detach().clone() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            out[(i, k)] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return out


def _assert_unchanged(before, after):
    """Every tensor of ``before`` unchanged (a step may have allocated an empty memory for a parameter
    that had none: zeros, count 0, as its first step would)."""
    assert before.keys() <= after.keys()
    for k in before:
        a, b = before[k], after[k]
        assert a.shape == b.shape and a.dtype == b.dtype, k
        assert torch.equal(a, b), f"{k} was written by a step that raised"


def _memory(opt, params):
    return {(i, k): v for (i, k), v in _snapshot(opt, params).items() if i != "p" and is_memory_key(k)}


def _assert_same(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=str(k))
        else:
            torch.testing.assert_close(a[k], b[k], msg=str(k))


def _stream(steps, seed=1):
    return list(gradient_stream(steps, seed=seed, skip_every=0))


# -- p.data resized: Net2Net widening, structured pruning --------------------------------------------


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("numel", [4096, 1], ids=["grown", "shrunk"])
def test_a_resized_parameter_raises_before_anything_is_written(executor, numel):
    params = make_params()
    opt = _opt(params, executor)
    _run(opt, params, _stream(4))
    params[1].data = torch.randn(numel)  # was (5,)
    params[1].grad = torch.randn(numel)
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"param group 0, parameter 1 .*'exp_avg'"):
        opt.step()
    _assert_unchanged(before, _snapshot(opt, params))

    # torch's own AdamW raises the same kind of error on the same action
    ref = [p.detach().clone().requires_grad_() for p in make_params()]
    torch_opt = torch.optim.AdamW(ref, lr=1e-2)
    _run(torch_opt, ref, _stream(2))
    ref[1].data = torch.randn(numel)
    ref[1].grad = torch.randn(numel)
    with pytest.raises(RuntimeError):
        torch_opt.step()


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_gradient_of_another_size_raises(executor):
    params = make_params()
    opt = _opt(params, executor)
    _run(opt, params, _stream(2))
    for p, g in zip(params, _stream(1, seed=5)[0]):
        p.grad = g
    params[0].data = torch.randn(3, 3)  # replaced after the backward: the old gradient is (7, 5)
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"parameter 0: its gradient has shape \(7, 5\)"):
        opt.step()
    _assert_unchanged(before, _snapshot(opt, params))


# -- a checkpoint that does not fit the model -----------------------------------------------------


def _saved(executor, shapes, memory=True):
    params = make_params(shapes=shapes)
    opt = _opt(params, executor)
    _run(opt, params, list(gradient_stream(3, skip_every=0, shapes=shapes)))
    sd = copy.deepcopy(opt.state_dict())
    return sd if memory else hf_memopt.without_memory(sd)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("memory", [True, False], ids=["with-memory", "base-state-only"])
@pytest.mark.parametrize(
    "saved_shapes", [[(7, 5), (9,)], [(7, 5), (2,)], [(5,), (7, 5)]], ids=["grew", "shrank", "reordered"]
)
def test_a_checkpoint_of_another_model_raises_before_anything_is_written(executor, memory, saved_shapes):
    """Resumed into a model whose parameter has another size, or whose parameters swapped registration
    order: an error naming the parameter and the key (at load, or at the first step), never a crash."""
    sd = _saved(executor, saved_shapes, memory)
    shapes = [(7, 5), (5,)]
    params = make_params(shapes=shapes)
    opt = _opt(params, executor)
    _run(opt, params, list(gradient_stream(1, skip_every=0, shapes=shapes)))
    before = _snapshot(opt, params)
    try:
        opt.load_state_dict(sd)
    except ValueError as err:  # the memory's shapes are checked at load
        assert "parameter" in str(err)
        _assert_unchanged(before, _snapshot(opt, params))
        return
    set_grads(params, list(gradient_stream(1, seed=7, skip_every=0, shapes=shapes))[0])
    loaded = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"param group 0, parameter [01] .*'(exp_avg|memory_0|memory_sum)'"):
        opt.step()
    _assert_unchanged(loaded, _snapshot(opt, params))


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_checkpoint_with_a_parameter_more_is_refused_as_torch_refuses_it(executor):
    sd = _saved(executor, [(7, 5), (5,)])
    params = make_params(shapes=[(7, 5), (5,), (3,)])
    opt = _opt(params, executor)
    with pytest.raises(ValueError, match="doesn.t match the size of optimizer.s group"):
        opt.load_state_dict(sd)


# -- state tensors given new storage: clone, share_memory_, optimizer_to(device) ----------------------


def _clone_data(t):
    t.data = t.data.clone()


def _share(t):
    t.share_memory_()


def _to_device(t):
    # the common optimizer_to(device) helper: ``.data = .data.to(device)`` (a copy, as a move would be)
    t.data = t.data.to(torch.device("cpu"), copy=True)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("action", [_clone_data, _share, _to_device], ids=["clone", "share_memory", "optimizer_to"])
@pytest.mark.parametrize("optimizer", ["adamw", "cm"])
def test_state_given_new_storage_continues_exactly(executor, action, optimizer):
    """After the first steps every state tensor gets new storage (the parameters keep theirs, so nothing but
    the state tells the executor); the run continues
    bit for bit as an undisturbed one, and the old storages are not written (a use-after-free would)."""
    cls = hf_memopt.MemoryAugmentedAdamW if optimizer == "adamw" else hf_memopt.CriticalMomentaAdamW
    stream = _stream(12)
    params, twin = make_params(), make_params()
    opt = cls(params, lr=1e-2, topc=3, decay=0.8, executor=executor)
    ref = cls(twin, lr=1e-2, topc=3, decay=0.8, executor=executor)
    _run(opt, params, stream[:5])
    _run(ref, twin, stream[:5])
    old = []
    for p in params:
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor):  # the memory's scalars and the step counters too
                old.append((v.data, v.data.clone()))
                action(v)
    _run(opt, params, stream[5:])
    _run(ref, twin, stream[5:])
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    _assert_same(_memory(opt, params), _memory(ref, twin))
    if action is not _share:  # share_memory_() moves a storage in place: its aliases follow it
        for storage, copy_ in old:
            assert torch.equal(storage, copy_), "a step wrote into a storage the state no longer uses"


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_state_entry_replaced_is_what_the_next_step_uses(executor):
    """``optimizer.state[p]["memory_1"] = ...`` (a new tensor object): the executor reads the new one."""
    stream = _stream(10)
    params, twin = make_params(), make_params()
    opt, ref = _opt(params, executor), _opt(twin, "torch")
    _run(opt, params, stream[:5])
    _run(ref, twin, stream[:5])
    for p, q in zip(params, twin):
        for key in ("memory_1", "memory_sum", "exp_avg"):
            new = opt.state[p][key].clone() * 0.5
            opt.state[p][key] = new
            ref.state[q][key] = new.clone()
    _run(opt, params, stream[5:])
    _run(ref, twin, stream[5:])
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.detach(), q.detach())
    _assert_same(_memory(opt, params), _memory(ref, twin), exact=False)


# -- edits to the state's values and to the group's flags ----------------------------------------


@pytest.mark.parametrize("executor", ["torch", pytest.param("cpu", marks=needs("cpu"))])
@pytest.mark.parametrize("count", [7, -1])
@pytest.mark.parametrize("host", [False, True], ids=["", "host-decisions"])
@pytest.mark.parametrize("optimizer", ["adamw", "cm"])
def test_a_memory_count_edited_out_of_range_raises_before_anything_is_written(executor, count, host, optimizer):
    """Critical Momenta's momenta included: they are advanced before the decisions, and the check is earlier."""
    params = make_params()
    cls = hf_memopt.MemoryAugmentedAdamW if optimizer == "adamw" else hf_memopt.CriticalMomentaAdamW
    opt = cls(params, lr=1e-2, topc=3, decay=0.8, executor=executor)
    if host:
        opt.norm_reducer = lambda units, sq: sq  # decisions on the host, as in sharded runs
    _run(opt, params, _stream(4))
    opt.state[params[2]]["memory_count"].fill_(count)  # topc is 3
    _step_raises_before_writing(opt, params, r"memory_count .*outside \[0, topc=3\]")


def _step_raises_before_writing(opt, params, match):
    """The next step (fresh gradients) raises ``ValueError`` matching ``match`` and changes nothing."""
    set_grads(params, _stream(1, seed=3)[0])
    before = _snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.step()
    _assert_unchanged(before, _snapshot(opt, params))


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("count", [7, -1])
@pytest.mark.parametrize("how", [".data", "replaced"])
@pytest.mark.parametrize("optimizer", ["adamw", "cm"])
def test_a_memory_count_replaced_out_of_range_raises_before_anything_is_written(executor, count, how, optimizer):
    """A count given new storage or replaced is read back (the scalars are the truth) and range-checked on
    every executor, "triton" included (it gathers the ledger then), before Critical Momenta's momenta move."""
    params = make_params()
    cls = hf_memopt.MemoryAugmentedAdamW if optimizer == "adamw" else hf_memopt.CriticalMomentaAdamW
    opt = cls(params, lr=1e-2, topc=3, decay=0.8, executor=executor)
    _run(opt, params, _stream(4))
    state = opt.state[params[2]]
    if how == ".data":
        state["memory_count"].data = torch.tensor(count)
    else:
        state["memory_count"] = torch.tensor(count)
    _step_raises_before_writing(
        opt, params, r"param group 0, parameter 2: its memory_count of .* outside \[0, topc=3\]"
    )


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("key", ["priority_1", "stored_at_0", "memory_clock"])
def test_a_ledger_scalar_replaced_by_a_tensor_of_another_size_raises_before_anything_is_written(executor, key):
    params = make_params()
    opt = _opt(params, executor)
    _run(opt, params, _stream(4))
    opt.state[params[1]][key] = torch.zeros(3, dtype=opt.state[params[1]][key].dtype)
    _step_raises_before_writing(
        opt, params, rf"param group 0, parameter 1: optimizer state '{key}' has 3 element\(s\), but its parameter"
    )


@needs("triton")
@pytest.mark.parametrize("count, clamped", [(7, 3), (-1, 0)])
def test_a_memory_count_edited_out_of_range_is_clamped_on_the_device(count, clamped):
    """The "triton" executor reads its ledger on the device only: a count outside [0, topc] is clamped into it
    (never an index past the slots), and the run continues as the "torch" executor does from the clamped
    count."""
    stream = _stream(8)
    params, twin = make_params(), make_params()
    opt = _opt(params, "triton")
    _run(opt, params, stream[:4])
    ref = _opt(twin, "torch")
    with torch.no_grad():
        for p, q in zip(params, twin):
            q.copy_(p)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.state[params[2]]["memory_count"].fill_(count)
    ref.state[twin[2]]["memory_count"].fill_(clamped)
    _run(opt, params, stream[4:])
    _run(ref, twin, stream[4:])
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.detach(), q.detach())
    _assert_same(_memory(opt, params), _memory(ref, twin), exact=False)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize(
    "edit",
    [{"maximize": True}, {"decoupled_weight_decay": False}, {"weight_decay": 0.0}, {"betas": (0.8, 0.99)}],
    ids=["maximize", "decoupled", "weight_decay", "betas"],
)
def test_group_flags_edited_mid_run_are_honoured(executor, edit):
    """As torch's optimizers honour an edited ``param_groups`` entry at the next step, so does every executor:
    against the "torch" executor with the same edit."""
    stream = _stream(10)
    params, twin = make_params(), make_params()
    opt = hf_memopt.MemoryAugmentedAdam(params, lr=1e-2, topc=3, weight_decay=0.1, executor=executor)
    ref = hf_memopt.MemoryAugmentedAdam(twin, lr=1e-2, topc=3, weight_decay=0.1, executor="torch")
    _run(opt, params, stream[:4])
    _run(ref, twin, stream[:4])
    opt.param_groups[0].update(edit)
    ref.param_groups[0].update(edit)
    _run(opt, params, stream[4:])
    _run(ref, twin, stream[4:])
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    _assert_same(_memory(opt, params), _memory(ref, twin), exact=False)


@pytest.mark.parametrize("executor", ["auto", "torch"])
def test_channels_last_state_next_to_contiguous_parameters_continues(executor):
    """A channels_last run switched to contiguous parameters: "auto" checks the state as well as the
    parameters, so it does not pick an executor that then refuses the group; it continues as "torch"."""
    conv = [torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last).requires_grad_()]
    twin = [conv[0].detach().clone().to(memory_format=torch.channels_last).requires_grad_()]
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(4, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last)] for _ in range(8)]
    opt, ref = _opt(conv, executor), _opt(twin, "torch")
    _run(opt, conv, grads[:3])
    _run(ref, twin, grads[:3])
    conv[0].data = conv[0].data.contiguous()
    twin[0].data = twin[0].data.contiguous()
    contiguous = [[g.contiguous() for g in gs] for gs in grads[3:]]
    _run(opt, conv, contiguous)
    _run(ref, twin, contiguous)
    torch.testing.assert_close(conv[0].detach(), twin[0].detach(), rtol=0, atol=0)
    assert opt.executor_for(0) == "torch"


@pytest.mark.parametrize("executor", ["auto", *FAST])
def test_state_the_kernel_cannot_read_runs_on_torch_or_is_refused(executor):
    """An fp64 running sum (state moved to another dtype): "auto" continues on the "torch" executor, exactly
    as it does; a forced fast executor refuses the group before anything is written."""
    stream = _stream(6)
    params, twin = make_params(), make_params()
    opt, ref = _opt(params, executor), _opt(twin, executor)
    _run(opt, params, stream[:2])
    _run(ref, twin, stream[:2])
    ref.executor = "torch"
    for o, ps in ((opt, params), (ref, twin)):
        o.state[ps[1]]["memory_sum"] = o.state[ps[1]]["memory_sum"].double()
    if executor == "auto":
        _run(opt, params, stream[2:])
        _run(ref, twin, stream[2:])
        assert opt.executor_for(0) == "torch"
        for p, q in zip(params, twin):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
        return
    set_grads(params, stream[2])
    before = _snapshot(opt, params)
    with pytest.raises(ValueError, match=f"executor='{executor}' cannot run param group 0: .*memory_sum"):
        opt.step()
    _assert_unchanged(before, _snapshot(opt, params))


# -- a base update that raises after admission ------------------------------------------------------


class _FailingUpdate:
    """The optimizer's base update, raising once at step ``at`` (an OOM, an interrupt the caller catches)."""

    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _maybe_fail(self):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt("interrupted in the base update")

    def update(self, *args, **kwargs):
        self._maybe_fail()
        return self.inner.update(*args, **kwargs)

    def finish(self, *args, **kwargs):
        self._maybe_fail()
        return self.inner.finish(*args, **kwargs)


@pytest.mark.parametrize("executor", ["torch", pytest.param("triton", marks=needs("triton"))])
@pytest.mark.parametrize("optimizer", ["adamw", "cm"])
def test_a_base_update_that_raises_leaves_the_memory_consistent(executor, optimizer):
    """The memory of a step whose base update raised is that step's memory (as in a run where it did not
    raise), and S equals the sum of the stored slots: no stale S for up to 127 steps."""
    cls = hf_memopt.MemoryAugmentedAdamW if optimizer == "adamw" else hf_memopt.CriticalMomentaAdamW
    # foreach=True: the base update is torch's own (the triton executor's in-kernel Adam cannot fail midway)
    kw = dict(lr=1e-2, topc=3, decay=0.8, executor=executor, foreach=True)
    stream = _stream(9)
    params, twin = make_params(), clone_params(make_params())
    opt, ref = cls(params, **kw), cls(twin, **kw)
    opt._base_update = _FailingUpdate(opt._base_update, at=6)
    for t, grads in enumerate(stream):
        set_grads(params, grads)
        set_grads(twin, grads)
        try:
            opt.step()
        except KeyboardInterrupt:
            assert t == 5
        ref.step()
        if optimizer == "cm" and t == 5:
            break  # CM's memory holds momenta: after a lost parameter update the runs part ways
    _assert_same(_memory(opt, params), _memory(ref, twin))
    for p in params:
        state = opt.state[p]
        n = int(state["memory_count"])
        expected = state["memory_0"].float().clone()
        for i in range(1, n):
            expected += state[f"memory_{i}"].float()
        # a running sum (S - evicted + stored): equal to the slots' sum up to its rounding, until the refresh
        torch.testing.assert_close(state["memory_sum"], expected, rtol=1e-5, atol=1e-5)


# -- CUDA graph capture (the "triton" executor; capture simulated: these machines have no GPU) --------


def _captured_after_eager_steps(monkeypatch):
    """A "triton" optimizer after eager steps (gradients kept in place: every table built), then one step
    under a simulated capture; returns it, its parameters and the unused gradients."""
    from hf_memopt.engine.executors import triton_layout

    params = make_params()
    opt = _opt(params, "triton")
    grads = _stream(6)
    set_grads(params, grads[0])
    for g in grads[1:3]:
        opt.step()
        for p, new in zip(params, g):
            p.grad.copy_(new)
    monkeypatch.setattr(triton_layout, "capturing", lambda device: True)
    opt.step()  # captured: same addresses, nothing to build
    return opt, params, grads[4:]


@needs("triton")
def test_new_gradient_addresses_during_a_capture_are_an_error_not_a_stale_table(monkeypatch):
    opt, params, grads = _captured_after_eager_steps(monkeypatch)
    set_grads(params, grads[0])  # new gradient tensors: a replay would read the old addresses
    with pytest.raises(RuntimeError, match=r"during CUDA graph capture: the gradients' addresses changed"):
        opt.step()


@needs("triton")
def test_a_ledger_scalar_given_new_storage_during_a_capture_is_an_error(monkeypatch):
    """Gathering the ledger copies host values to the device: inside a capture that is an error that says
    what to do, raised before anything is written."""
    opt, params, _grads = _captured_after_eager_steps(monkeypatch)
    state = opt.state[params[0]]
    state["memory_clock"].data = state["memory_clock"].data.clone()
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"during CUDA graph capture: the ledger must be gathered"):
        opt.step()
    _assert_unchanged(before, _snapshot(opt, params))


@pytest.mark.parametrize("executor", ["torch", pytest.param("triton", marks=needs("triton"))])
def test_the_step_that_allocates_the_memory_reads_no_device_counter(executor, monkeypatch, caplog):
    """The first step logs the state's size without draining the admission counters (on a GPU a read of
    the "triton" executor's device counters is a synchronisation inside the step)."""
    params = make_params()
    opt = _opt(params, executor)
    monkeypatch.setattr(opt._engine.stats, "drain", lambda: pytest.fail("the step read the device counters"))
    set_grads(params, _stream(1)[0])
    with caplog.at_level("INFO", logger="hf_memopt"):
        opt.step()
    assert any("GB of optimizer state" in r.getMessage() for r in caplog.records)


# -- the ledger's scalars are the truth, as torch's state tensors are ------------------------------------


EDITS = {"priority_1": lambda t: t + 1e6, "memory_count": lambda t: t - 1, "memory_clock": lambda t: t + 1000}


def _edit(state, key, how):
    value = EDITS[key](state[key].detach().clone())
    if how == "in place":
        state[key].copy_(value)
    elif how == ".data":
        state[key].data = value
    else:
        state[key] = value


def _edited_run(executor, key, how, when, then=None):
    """Three steps, then (``when``) the edit of parameter 0's ``key`` by ``how``, then five steps (with the
    executor switched to ``then`` after the first two); after a load, parameter 0 has no gradient at the
    first step, so that executors binding its ledger at different times see the edit alike."""
    params = make_params()
    opt = _opt(params, executor)
    stream = _stream(8)
    _run(opt, params, stream[:3])
    if when == "after a load":
        saved = copy.deepcopy(opt.state_dict())
        opt = _opt(params, executor)
        opt.load_state_dict(saved)
        _run(opt, params, [[None, *stream[3][1:]]])
    if key is not None:
        _edit(opt.state[params[0]], key, how)
    _run(opt, params, stream[4:6])
    if then is not None:
        opt.executor = then
    _run(opt, params, stream[6:])
    return opt, params


def _final(opt, params):
    return {**_memory(opt, params), **{("p", i): p.detach().clone() for i, p in enumerate(params)}}


@pytest.mark.parametrize("when", ["between steps", "after a load"])
@pytest.mark.parametrize("how", [".data", "replaced"])
@pytest.mark.parametrize("key", list(EDITS))
@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_ledger_scalar_given_new_storage_or_replaced_is_read_back(checker, executor, key, how, when):
    """``state[p][key].data = new`` or ``state[p][key] = new`` on one of the memory's scalars: the next step
    reads the new value, as torch's optimizers read a replaced ``state[p]["step"]``, on every executor. The
    expectation is the same value written in place on the "torch" executor (in place, the scalar stays a
    view of the ledger every executor reads); the edit must change the run (checked against no edit)."""
    opt, params = _edited_run(executor, key, how, when)
    ref, ref_params = _edited_run("torch", key, "in place", when)
    untouched, untouched_params = _edited_run("torch", None, None, when)
    got, want = _final(opt, params), _final(ref, ref_params)
    _assert_same(got, want, exact=executor == "torch")
    unchanged = _final(untouched, untouched_params)
    assert any(not torch.equal(want[k], unchanged[k]) for k in want), "the edit did not change the run"


SWITCHES = [
    pytest.param("triton", "torch", marks=needs("triton")),
    pytest.param("torch", "triton", marks=needs("triton")),
    pytest.param("cpu", "triton", marks=needs("cpu", "triton")),
    pytest.param("triton", "cpu", marks=needs("cpu", "triton")),
    pytest.param("cpu", "torch", marks=needs("cpu")),
]


@pytest.mark.parametrize("key", list(EDITS))
@pytest.mark.parametrize("first,then", SWITCHES)
def test_a_ledger_scalar_given_new_storage_then_an_executor_switch_matches_torch(first, then, key):
    """The same ``.data`` edit, then the ledger moves to another executor (host <-> device): the edited value
    is what moves (found by 300 random sequences: Critical Momenta, triton -> torch, sequence 29)."""
    opt, params = _edited_run(first, key, ".data", "between steps", then=then)
    ref, ref_params = _edited_run("torch", key, "in place", "between steps")
    assert opt.executor_for(0) == then
    _assert_same(_final(opt, params), _final(ref, ref_params), exact=False)
