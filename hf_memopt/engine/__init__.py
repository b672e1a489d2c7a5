"""The critical-gradient memory engine (SPEC sections 1-3): the step rule, its state, its executors.

Read ``docs/design.md`` first. Where things live:

* :mod:`.rule`       -- the step rule of SPEC section 1, stated once (host, numpy);
* :mod:`.state`      -- the state layout of SPEC section 3 and the host ledger;
* :mod:`.norms`      -- batched local norms (fp64) and max-abs of gradient views;
* :mod:`.plan`       -- decisions on the host: one norm pass, one all-reduce, one transfer;
* :mod:`.step`       -- one optimizer step: executor per group, plan, run, commit;
* :mod:`.executors`  -- "torch" (any device, multi-tensor), "cpu" (the C kernel) and "triton" (the GPU
  engine, decisions on the device), and the function that picks one per param group;
* :mod:`.checkpoint` -- load hooks, ``without_memory``.

Glossary:

* **unit**: what has one priority per step and one row of memory: a parameter tensor, or one
  segment of a flat partition;
* **segment**: ``(start, numel)``, the slice of a flat partition (DeepSpeed ZeRO) that holds one
  model tensor; bound with ``optimizer.bind_segments``;
* **slot**: one stored gradient of a unit (``memory_i``, shaped like the parameter, ``buffer_dtype``;
  a stored momentum under Critical Momenta, SPEC 1b); a unit has ``topc`` slots, filled in order;
* **memory source**: what a base-update strategy's memory aggregates and stores: the gradients, or the
  momenta (``stores_momentum``: advanced in the executor's ``prepare``, before the decisions);
* **ledger**: the small table of a parameter's scalars, one row per unit: priorities and
  ``stored_at`` per slot, the count of filled slots and the clock; the state's ``priority_i``,
  ``stored_at_i``, ``memory_count`` and ``memory_clock`` are views into it. It lives on the host
  (numpy views, the "torch" and "cpu" executors) or, under the "triton" executor, on the parameters'
  device (``opt._engine.device_ledgers``), and moves when another executor takes the group. The scalars
  are the truth: a ledger is used while every scalar is the view it bound (``state.Binding``);
* **clock**: how many steps a unit took part in (had a gradient);
* **refresh**: every ``REFRESH_INTERVAL`` (128) ticks of a unit's clock, ``S`` (``memory_sum``, the
  running sum of the slots) is rebuilt exactly from the slots, so rounding cannot drift.
"""
