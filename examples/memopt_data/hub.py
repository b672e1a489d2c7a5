"""Hub first for online users, the embedded registry default otherwise -- always saying which one ran."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Literal, TypeVar
from urllib.parse import urlparse

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


#: How long :func:`hub_reachable` waits for a TCP connection to the Hub.
HUB_PROBE_TIMEOUT_S = 2.0
_probe_lock = threading.Lock()
_probe_result: bool | None = None


def _hub_address() -> tuple[str, int]:
    """Host and port of the Hub endpoint (``HF_ENDPOINT`` if set, else huggingface.co:443)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def go_offline() -> None:
    """Turn on the Hugging Face libraries' offline mode for the rest of this process.

    Sets ``HF_HUB_OFFLINE=1`` (read by libraries imported later) and the constant that an already
    imported ``huggingface_hub`` consults, so nothing spends its retries on an unreachable Hub.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
        constants.HF_HUB_OFFLINE = True


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hub answers a TCP connection within ``timeout`` seconds; checked once per process.

    False without probing when offline mode is on. When the probe fails, offline mode is turned on
    (:func:`go_offline`) and one INFO line says so: the libraries would otherwise retry each
    resource for about 25 s before the fallback. A reachable host does not guarantee a download
    succeeds; :func:`resolve` still falls back when one fails.
    """
    global _probe_result
    if hub_offline():
        return False
    with _probe_lock:
        if _probe_result is None:
            host, port = _hub_address()
            try:
                with socket.create_connection((host, port), timeout=timeout):
                    _probe_result = True
            except OSError as err:
                _probe_result = False
                go_offline()
                logger.info(
                    "Hugging Face Hub unreachable (%s:%d: %s): using embedded stand-ins and HF_HUB_OFFLINE=1 for the "
                    "rest of this run.",
                    host,
                    port,
                    err or "timed out",
                )
        return _probe_result


def resolve(
    source: str,
    what: str,
    from_hub: Callable[[], T],
    embedded: Callable[[], T],
    standin: str,
) -> tuple[T, Literal["hub", "embedded"]]:
    """Load ``what`` from the Hub or from its embedded stand-in, per ``source``.

    ``"hub"``: only the Hub, errors propagate. ``"embedded"``: only the registry default. ``"auto"``: the Hub
    unless offline mode is on or :func:`hub_reachable` finds it unreachable (a 2 s probe, once per process);
    if the Hub fails, the stand-in, with a warning that names it. Either way the
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
        if not hub_reachable():
            logger.info("Hub offline: using the embedded stand-in for %s: %s", what, standin)
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
