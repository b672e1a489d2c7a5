"""What the example scripts (``examples/glue/run_glue.py``, ``examples/clm/run_clm.py``) share.

* :func:`setup_logging`: our INFO lines (which data and model ran) on the main process, the libraries at the
  run's log level, and no progress bars at all with ``--disable_tqdm true``;
* :func:`log_run_setup`: one line on the process layout (a WARNING on every process only under a
  multi-process launch), the full ``TrainingArguments`` only at DEBUG (``--log_level debug``);
* :func:`script_defaults`: no checkpoints during training unless asked (a checkpoint of a memopt
  optimizer holds ``topc`` gradient copies per parameter: 4.1 GB for SmolLM2-135M), no pinned memory
  without an accelerator;
* :func:`fill_model_index`: the card's ``datasets:`` and ``model-index`` results from the evaluation, which
  transformers leaves empty for data that is not a Hub dataset and for metrics it has no tag for (perplexity).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def script_defaults() -> dict[str, Any]:
    """``TrainingArguments`` defaults of the example scripts (a flag on the command line overrides them).

    No checkpoints during training unless asked; without an accelerator no pinned memory (torch warns that it
    cannot pin without one, once per data loader).
    """
    import torch

    defaults: dict[str, Any] = {"save_strategy": "no"}
    if not torch.accelerator.is_available():
        defaults["dataloader_pin_memory"] = False
    return defaults


#: Evaluation keys written into ``model-index`` (metric type, display name), when present.
_CARD_METRICS: dict[str, tuple[str, str]] = {
    "eval_accuracy": ("accuracy", "Accuracy"),
    "eval_f1": ("f1", "F1"),
    "eval_matthews_correlation": ("matthews_correlation", "Matthews correlation"),
    "eval_pearson": ("pearsonr", "Pearson correlation"),
    "eval_spearmanr": ("spearmanr", "Spearman correlation"),
    "eval_mse": ("mse", "Mean squared error"),
    "perplexity": ("perplexity", "Perplexity"),
    "eval_loss": ("loss", "Loss"),
}


def setup_logging(training_args: Any, *logger_names: str) -> None:
    """Log to stdout: ``hf_memopt``, ``memopt_data`` and ``logger_names`` at INFO on the main process, the libraries at the run's
    log level; ``--disable_tqdm true`` also silences the tokenization and checkpoint-writing progress bars."""
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    ours = min(level, logging.INFO) if training_args.should_log else level
    for name in ("hf_memopt", "memopt_data", *logger_names):
        logging.getLogger(name).setLevel(ours)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    if training_args.disable_tqdm:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def log_run_setup(logger: logging.Logger, training_args: Any) -> None:
    """The process layout (a WARNING, so shown by every process, under a multi-process launch: it shows one that
    did not become distributed; INFO for a single process), whether checkpoints are written, and the full
    arguments at DEBUG."""
    distributed = training_args.parallel_mode.value == "distributed"
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    logger.log(
        logging.WARNING if launched > 1 else logging.INFO,
        "Process rank: %d of %d, device: %s, distributed training: %s",
        training_args.process_index,
        training_args.world_size,
        training_args.device,
        distributed,
    )
    if str(getattr(training_args.save_strategy, "value", training_args.save_strategy)) == "no":
        logger.info(
            "No checkpoints during training (--save_strategy no, the default here); the final model is saved. "
            "For resumable checkpoints: --save_strategy steps --save_steps N (add --optim_args save_memory=false "
            "to leave the gradient memory out of them)."
        )
    logger.debug("Training/evaluation parameters %s", training_args)


def _last_eval(trainer: Any) -> dict[str, Any] | None:
    return next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)


def _eval_keys(entry: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in entry.items() if k.startswith("eval_") or k == "epoch"}


def last_eval_metrics(trainer: Any) -> dict[str, float] | None:
    """The ``eval_*`` values (and ``epoch``) of the Trainer's last evaluation, or None if it never evaluated."""
    last = _last_eval(trainer)
    return None if last is None else _eval_keys(last)


def final_eval_metrics(trainer: Any) -> dict[str, float]:
    """Evaluation metrics of the final model, reusing an evaluation the Trainer just ran at the last step.

    With ``--eval_strategy steps`` and ``max_steps`` a multiple of ``eval_steps`` the model was evaluated on the
    same data at the last step already; evaluating again would cost time and give the same numbers.
    """
    last = _last_eval(trainer)
    if last is not None and trainer.state.global_step > 0 and last.get("step") == trainer.state.global_step:
        return _eval_keys(last)
    return trainer.evaluate()


def fill_model_index(
    card_path: str | os.PathLike[str],
    *,
    task_type: str,
    dataset_type: str,
    dataset_name: str,
    metrics: Mapping[str, float],
    dataset_config: str | None = None,
) -> None:
    """Write ``datasets: [dataset_type]`` and one ``model-index`` result per known metric into the card.

    ``dataset_type`` is the Hub id for Hub data; for a registry stand-in, the archive it came from (e.g.
    ``vaderSentiment==3.3.2``), so the card never claims a Hub dataset that was not used. No-op without metrics.
    """
    from huggingface_hub import EvalResult, ModelCard

    path = Path(card_path)
    card = ModelCard.load(path)
    results = []
    for key, (metric_type, metric_name) in _CARD_METRICS.items():
        value = metrics.get(key)
        if value is None or not math.isfinite(float(value)):
            continue
        results.append(
            EvalResult(
                task_type=task_type,
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_config=dataset_config,
                dataset_split="validation",
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=round(float(value), 4),
            )
        )
    if not results:
        return
    card.data.datasets = [dataset_type]
    card.data.eval_results = results
    card.data.model_name = card.data.model_name or path.parent.name
    card.save(path)


__all__ = [
    "fill_model_index",
    "final_eval_metrics",
    "last_eval_metrics",
    "log_run_setup",
    "script_defaults",
    "setup_logging",
]
