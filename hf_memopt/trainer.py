"""``MemOptTrainer``: the 🤗 ``Trainer`` plus memory statistics in the logs and an
optimizer section in the model card.

The plain ``Trainer`` already trains with ``optim="memopt_adamw"`` once hf_memopt is
imported; this subclass only adds reporting:

* after the first optimizer step, the optimizer-state size goes into the Trainer's logs once
  (``memopt/state_bytes`` and ``memopt/memory_bytes``: printed on the console, kept in
  ``trainer_state.json``, sent to trackers), next to the optimizer's own INFO line on the
  ``hf_memopt`` logger: a checkpoint's ``optimizer.pt`` is about that size;
* every logging step that reports the training loss also reports
  ``optimizer.memory_stats(reader="MemOptTrainer")`` under ``memopt/...`` (admissions and
  rejections since the previous logging step, whatever other code reads meanwhile;
  admission rate, fill, mean age in steps, memory and state bytes);
* ``create_model_card()`` (offline; only ``push_to_hub`` needs the network) writes
  ``README.md`` with the tags ``hf_memopt`` and the optim name and a section naming the
  optimizer, every hyperparameter, the optimizer-state bytes and the paper.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import Trainer, TrainerCallback

from .integrations.model_card import insert_section, optimizer_section, spec_of, unwrap_optimizer
from .integrations.transformers import LIBRARY_TAG, register

register()  # this module is usable on its own: `from hf_memopt.trainer import MemOptTrainer`

#: Prefix of the memory statistics in the logs.
LOG_PREFIX = "memopt/"
#: The ``memory_stats(reader=...)`` counters the logs read (admissions since the previous logging step).
LOG_READER = "MemOptTrainer"


class _StateSizeAtFirstStep(TrainerCallback):
    """Puts the optimizer-state size into the Trainer's logs once, right after the first optimizer step."""

    def __init__(self, trainer: MemOptTrainer) -> None:
        self.trainer = trainer
        self.done = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.done:
            return
        optimizer = self.trainer.memopt_optimizer()
        if optimizer is None:
            return
        self.done = True
        stats = optimizer.memory_stats(reset=False, reader=LOG_READER)
        total, memory = int(stats["state_bytes"]), int(stats["memory_bytes"])
        # Its own log entry (printed by the Trainer's console callbacks, kept in log_history, sent to
        # trackers). Logging clears control.should_log, which may be set for this very step's loss log.
        should_log = control.should_log
        self.trainer.log({LOG_PREFIX + "state_bytes": total, LOG_PREFIX + "memory_bytes": memory})
        control.should_log = should_log


class MemOptTrainer(Trainer):
    """A ``Trainer`` that reports the critical-gradient memory of a ``memopt_*`` optimizer.

    Use it exactly like ``Trainer`` (e.g. with ``TrainingArguments(optim="memopt_adamw")``
    or ``optimizers=(MemoryAugmentedAdamW(...), None)``). With any other optimizer it
    behaves as the plain ``Trainer``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(_StateSizeAtFirstStep(self))

    def memopt_optimizer(self) -> Any:
        """The hf_memopt optimizer being trained (unwrapped from accelerate), or None."""
        return unwrap_optimizer(self.optimizer)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add ``memory_stats()`` to the training logs (those that carry ``loss``): its numbers; the
        executor's name (a string, which loggers such as TensorBoard would drop) goes to the model card."""
        optimizer = self.memopt_optimizer()
        if optimizer is not None and "loss" in logs:
            # its own reader: a user's memory_stats() call takes no counts away from the logs
            stats = optimizer.memory_stats(reader=LOG_READER)
            logs.update({LOG_PREFIX + k: v for k, v in stats.items() if isinstance(v, (int, float))})
        super().log(logs, *args, **kwargs)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """``Trainer.create_model_card`` plus the hf_memopt tags and optimizer section."""
        spec = spec_of(self.args, self.optimizer)
        if spec is not None:
            tags = [tags] if isinstance(tags, str) else list(tags or [])
            for tag in (LIBRARY_TAG, spec.name):
                if tag not in tags:
                    tags.append(tag)
        super().create_model_card(
            language=language,
            license=license,
            tags=tags,
            model_name=model_name,
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
            dataset=dataset,
            dataset_args=dataset_args,
        )
        if spec is None or not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, encoding="utf-8") as f:
            card = f.read()
        card = insert_section(card, optimizer_section(self.args, self.optimizer))
        with open(path, "w", encoding="utf-8") as f:
            f.write(card)


__all__ = ["LOG_PREFIX", "MemOptTrainer"]
