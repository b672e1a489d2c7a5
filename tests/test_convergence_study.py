"""The convergence study's runs survive a stop: a run stopped part-way and started again with the same
arguments ends with exactly the curve, losses and result of a run that was never stopped; and its paired
comparison over seeds is Student's paired t interval (scipy's, computed independently)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from convergence_study import checkpoints, fair, store, tasks
from convergence_study.runner import train_once


def _build_digits_with_dropout(seed: int):
    """The digits MLP with dropout, so that training draws from torch's global generator (as MiniLM's does)."""
    model, train_step, evaluate = tasks.build_digits(seed)
    model.insert(2, torch.nn.Dropout(0.3))
    return model, train_step, evaluate


TASKS = {
    **tasks.TASKS,
    "digits_dropout": dataclasses.replace(
        tasks.TASKS["digits"], name="digits_dropout", build=_build_digits_with_dropout
    ),
}

# digits: the paper's MLP, 50 steps per evaluation, no schedule; logreg: a warm-up + decay schedule. 160 and 70
# steps stop at 130 and 50, after the checkpoint at 100 or 40, so the resumed run redoes steps it already took.
CASES = [
    ("digits_dropout", 160, 130, "memopt_adam", {"topc": 5, "decay": 0.7}),
    ("digits", 160, 130, "adam", {}),
    ("digits", 160, 130, "memopt_adam", {"topc": 5, "decay": 0.7}),
    ("digits", 160, 130, "memopt_sgd", {"topc": 5, "decay": 0.7}),
    ("digits", 160, 130, "memopt_adamw_cm", {"topc": 10, "decay": 0.9}),
    ("logreg", 70, 50, "memopt", {"topc": 5, "decay": 0.7}),
]


@pytest.fixture(autouse=True)
def one_thread():
    """The study's digits runs use one thread (tiny ops, where a second one only adds synchronisation)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Stop(Exception):
    """Stands for the process being ended mid-run."""


def _stop_at(stop: int):
    def on_step(step: int, opt: torch.optim.Optimizer) -> None:
        if step == stop:
            raise _Stop

    return on_step


@pytest.mark.parametrize(("task_name", "steps", "stop", "optimizer", "memory"), CASES)
def test_a_run_stopped_and_started_again_equals_an_unsplit_one(
    tmp_path: Path, task_name: str, steps: int, stop: int, optimizer: str, memory: dict
) -> None:
    task = TASKS[task_name]
    lr = 1e-2 if optimizer.endswith("sgd") else 1e-3
    whole = train_once(task, optimizer, lr, 0, memory, steps=steps)

    ckpt = tmp_path / "run.pt"
    with pytest.raises(_Stop):
        train_once(task, optimizer, lr, 0, memory, steps=steps, checkpoint=ckpt, on_step=_stop_at(stop))
    last = (stop - 1) // task.eval_every * task.eval_every
    key = store.run_key(task.name, optimizer, lr, 0, memory, steps)
    assert checkpoints.load(ckpt, key)["step"] == last
    if memory:  # the memory is in the checkpoint, not rebuilt empty
        saved = checkpoints.load(ckpt, key)["optimizer"]["state"]
        assert any(any(k.startswith("memory") for k in s) for s in saved.values())

    resumed = train_once(task, optimizer, lr, 0, memory, steps=steps, checkpoint=ckpt)
    assert resumed["train_loss"] == whole["train_loss"]  # every step's loss, bit for bit
    assert resumed["curve"] == whole["curve"]
    assert resumed["final"] == whole["final"] and resumed["resumed_at"] == [last]


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    task = tasks.TASKS["digits"]
    ckpt = tmp_path / "run.pt"
    with pytest.raises(_Stop):
        train_once(task, "adam", 1e-3, 0, {}, steps=100, checkpoint=ckpt, on_step=_stop_at(60))
    with pytest.raises(ValueError, match="delete it to start the run over"):
        train_once(task, "adam", 2e-3, 0, {}, steps=100, checkpoint=ckpt)


def test_the_same_command_continues_and_records_each_epoch_once(tmp_path: Path, monkeypatch) -> None:
    # A task whose evaluation interval is an epoch (as PTB's), the digits MLP standing in for the LSTM.
    task = dataclasses.replace(tasks.TASKS["digits"], name="digits", eval_is_epoch=True)
    out, folder = tmp_path / "results.jsonl", tmp_path / "checkpoints"
    command = dict(optimizers=["memopt_adam"], stage="tune", lrs=[2e-3], memory=[{"topc": 5, "decay": 0.7}])
    real = fair.train_once

    def stopped_once(*args, **kwargs):
        monkeypatch.setattr(fair, "train_once", real)  # the next start runs undisturbed
        return real(*args, **kwargs, on_step=_stop_at(130))

    monkeypatch.setattr(fair, "train_once", stopped_once)
    with pytest.raises(_Stop):
        fair.run_fair(task, out, epochs=3, checkpoint_dir=folder, **command)
    assert [e["step"] for e in store.load_epochs(out)] == [50, 100] and store.load_rows(out) == []
    fair.run_fair(task, out, epochs=3, checkpoint_dir=folder, **command)

    (row,) = store.load_rows(out)
    epochs = store.load_epochs(out)
    assert [e["step"] for e in epochs] == [50, 100, 150], "each finished epoch is recorded once"
    assert [e["value"] for e in epochs] == [v for _, v in row["curve"][1:]]
    assert not list(folder.iterdir()), "the checkpoint is deleted once the run is recorded"
    unsplit = train_once(task, "memopt_adam", 2e-3, 0, {"topc": 5, "decay": 0.7}, steps=150)
    assert row["train_loss"] == unsplit["train_loss"] and row["resumed_at"] == [100]


def test_ptb_resumes_only_at_an_epoch_boundary() -> None:
    model = tasks.LSTMLM(10, emb=4, hidden=4)
    chunks = [(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))] * 4
    step = tasks._PTBStep(model, chunks, 10)
    step.skip(8)
    with pytest.raises(ValueError, match="epoch boundary"):
        step.skip(6)


def _rows(optimizer: str, finals: dict[int, float]) -> list[dict]:
    return [{"seed": s, "final": v, "optimizer": optimizer} for s, v in finals.items()]


def test_paired_difference_is_the_paired_t_interval() -> None:
    stats = pytest.importorskip("scipy.stats")
    base = {0: 0.97, 1: 0.96, 2: 0.975, 3: 0.965, 4: 0.97, 7: 0.5}
    memopt = {0: 0.972, 1: 0.958, 2: 0.98, 3: 0.97, 4: 0.969, 9: 0.1}  # seeds 7 and 9 have no partner
    d = fair.paired_difference(_rows("adam", base), _rows("memopt_adam", memopt))
    seeds = [0, 1, 2, 3, 4]
    ref = stats.ttest_rel([memopt[s] for s in seeds], [base[s] for s in seeds]).confidence_interval(0.95)
    assert d.n == 5 and d.seeds == tuple(seeds)
    assert d.mean == pytest.approx(sum(memopt[s] - base[s] for s in seeds) / 5)
    assert (d.low, d.high) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert d.verdict(higher_is_better=True) == "no difference detected at 5 seeds"
    worse = fair.paired_difference(_rows("adam", base), _rows("memopt_adam", {s: base[s] - 0.01 for s in seeds}))
    assert worse.verdict(higher_is_better=True) == "memopt worse at 5 seeds"
    assert worse.verdict(higher_is_better=False) == "memopt better at 5 seeds"  # lower is better: a loss
    one = fair.paired_difference(_rows("adam", base), _rows("memopt_adam", {0: 0.98}))
    assert one.n == 1 and math.isnan(one.low) and "no interval" in one.verdict(True)


def test_epoch_report_gives_our_metric_and_the_papers(tmp_path: Path, capsys) -> None:
    from convergence_study.plots import plot_epochs
    from convergence_study.report import report_epochs

    task = tasks.TASKS["ptb"]
    run = store.run_key("ptb", "adamw", 2e-2, 0, {}, task.steps)
    out = tmp_path / "ptb50.jsonl"
    for epoch, (val, test) in enumerate([(300.0, 290.0), (200.0, 195.0), (210.0, 190.0)], start=1):
        store.append_epoch(
            out, run, {"step": epoch * task.eval_every, "value": val, "test": test, "seconds": 60.0 * epoch}
        )
    assert not store.append_epoch(out, run, {"step": task.eval_every, "value": 1.0, "test": 1.0, "seconds": 1.0})
    report_epochs(store.load_epochs(out), task)
    table = capsys.readouterr().out
    # minimum validation 200 at epoch 2 and the test value there (ours); minimum test 190 at epoch 3 (the paper's)
    assert "| adamw | 0.02 | - | 0 | 3 of 50 | 200.00 (2) | 195.00 | 190.00 (3) | 60 |" in table
    plot_epochs(store.load_epochs(out), task, tmp_path / "ptb50.png")
    assert (tmp_path / "ptb50.png").stat().st_size > 0


def test_ptb_epoch_cost_counts_the_studys_chunks() -> None:
    """benchmarks/ptb_epoch_cost.py at the study's batch sees the study's epoch (tasks.ptb_steps_per_epoch) and
    at batch 20 the 21-times longer one; the timed sample is extrapolated and says so."""
    import ptb_epoch_cost

    seconds, timed, total = ptb_epoch_cost.epoch_seconds("memopt_adamw_cm", tasks.PTB_BATCH, 1)
    assert (timed, total) == (1, tasks.ptb_steps_per_epoch()) and seconds > 0
    _seconds, _timed, total20 = ptb_epoch_cost.epoch_seconds("adamw", 20, 1)
    rows = 929_589 // 20
    assert total20 == math.ceil((rows - 1) / tasks.PTB_BPTT)
