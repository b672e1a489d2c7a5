"""Hub first for online users, the embedded registry default otherwise -- always saying which one ran."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Literal, TypeVar

from .archives import EmbeddedDataError

logger = logging.getLogger(__name__)

T = TypeVar("T")
DataSource = Literal["auto", "hub", "embedded"]
DATA_SOURCES: tuple[str, ...] = ("auto", "hub", "embedded")
_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """Whether the user asked the Hugging Face libraries not to touch the network."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    try:
        from huggingface_hub import is_offline_mode
    except ImportError:  # older huggingface_hub: the environment variables above are all it reads
        return False
    return bool(is_offline_mode())


def resolve(
    source: str,
    what: str,
    from_hub: Callable[[], T],
    embedded: Callable[[], T],
    standin: str,
) -> tuple[T, Literal["hub", "embedded"]]:
    """Load ``what`` from the Hub or from its embedded stand-in, per ``source``.

    ``"hub"``: only the Hub, errors propagate. ``"embedded"``: only the registry default. ``"auto"``: the Hub
    unless offline mode is on; if the Hub fails, the stand-in, with a warning that names it. Either way the
    second element of the result says which one was used, so scripts can record it.

    Raises:
        ValueError: unknown ``source``.
        EmbeddedDataError: the stand-in was needed and could not be obtained (the message includes the Hub
            error when the Hub was tried first).
    """
    if source not in DATA_SOURCES:
        raise ValueError(f"data source must be one of {', '.join(DATA_SOURCES)}; got {source!r}")
    if source == "hub":
        return from_hub(), "hub"
    if source == "auto":
        if hub_offline():
            logger.info(
                "Hub offline mode is on (HF_HUB_OFFLINE): using the embedded stand-in for %s: %s", what, standin
            )
        else:
            try:
                return from_hub(), "hub"
            except Exception as err:  # any Hub failure means: use the registry copy, loudly
                logger.warning(
                    "Could not load %s from the Hub (%s); using the embedded stand-in: %s", what, err, standin
                )
                try:
                    return embedded(), "embedded"
                except EmbeddedDataError as emb_err:
                    raise EmbeddedDataError(
                        f"Neither the Hub nor the registry could provide {what}.\nHub: {err}\n{emb_err}"
                    ) from emb_err
    else:
        logger.info("Using the embedded stand-in for %s: %s", what, standin)
    return embedded(), "embedded"
