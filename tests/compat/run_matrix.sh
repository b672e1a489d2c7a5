#!/usr/bin/env bash
# Run the transformers integration tests (tests/test_transformers_*.py) against the oldest
# and the newest supported transformers (hf_memopt.integrations.transformers.SUPPORTED_TRANSFORMERS).
#
#   tests/compat/run_matrix.sh                 # 5.0.0 and 5.24.0
#   tests/compat/run_matrix.sh 5.2.0 5.10.4    # any versions
#
# Each version gets its own cached virtualenv made with --system-site-packages: torch,
# accelerate, peft, trl, datasets... come from the environment the script is run from
# (hf_memopt itself too, installed editable by .ci/run); only transformers (and whatever
# pip needs to downgrade for it, e.g. tokenizers) is installed into the venv. torch is
# pinned to the base environment's exact build so pip can never swap in another wheel.
# Bounded: 5 minutes per install, 10 minutes per test run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python}"
CACHE="${HF_MEMOPT_COMPAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hf_memopt/compat}"
if [ "$#" -gt 0 ]; then VERSIONS=("$@"); else VERSIONS=(5.0.0 5.24.0); fi

TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
PY_TAG="$("$PYTHON" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')"
mkdir -p "$CACHE"

for version in "${VERSIONS[@]}"; do
    venv="$CACHE/$PY_TAG-transformers-$version"
    echo "=== transformers $version ($venv)"
    if [ ! -x "$venv/bin/python" ]; then
        "$PYTHON" -m venv --system-site-packages "$venv"
    fi
    # [hub-kernels]: the `kernels` that this transformers accepts goes into the venv too. Without it the
    # venv sees the base environment's `kernels` (whatever the newest transformers pulled in), which an
    # older transformers fails to import with (5.0.0 with kernels 0.19: "Either a revision or a version
    # must be specified").
    timeout 300 "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "transformers[hub-kernels]==$version" "torch==$TORCH_VERSION"
    found="$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')"
    if [ "$found" != "$version" ]; then
        echo "expected transformers $version in $venv, found $found" >&2
        exit 1
    fi
    (cd "$ROOT" && timeout 600 "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_transformers_*.py)
done
echo "=== transformers integration passed with: ${VERSIONS[*]}"
