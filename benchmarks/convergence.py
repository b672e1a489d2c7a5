"""Convergence study of the optimizers: ``python benchmarks/convergence.py --help`` (the commands are in
``convergence_study/cli.py``'s docstring and docs/benchmarks.md).

The study is the package ``benchmarks/convergence_study``; this script is its command line. Its data comes
from ``memopt_data``, the examples' data layer in ``examples/``, which a script run by path does not find on
its own.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from convergence_study.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
