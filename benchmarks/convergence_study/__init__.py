"""The convergence study of the optimizers (``python benchmarks/convergence.py``), one module per job:

- :mod:`~convergence_study.tasks`: the problems (model, data stream, evaluation, tuning grid);
- :mod:`~convergence_study.runner`: one trial, resumable from :mod:`~convergence_study.checkpoints`;
- :mod:`~convergence_study.store`: the JSON-lines results file;
- :mod:`~convergence_study.fair`: the fair-budget protocol and the paired comparison over seeds;
- :mod:`~convergence_study.report` and :mod:`~convergence_study.plots`: tables and PNGs;
- :mod:`~convergence_study.cli`: the command line.

It is a benchmark beside the library, not part of it; its data comes from ``memopt_data`` (examples/).
"""
