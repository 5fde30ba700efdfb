"""The students of ``offline-distill --task lm``: a small built-in GPT (``gpt:layers=L,dim=D,heads=H``)
or a ``transformers`` causal LM built from a config directory (``hf:CONFIG_DIR``), each as a
module mapping token ids [B, l] (int64, l <= its context) to logits [B, l, V'].

``gpt:``: token and learned position embeddings, ``layers`` pre-LayerNorm blocks of causal
self-attention (``scaled_dot_product_attention(is_causal=True)``) and a GELU MLP 4x as wide, a
final LayerNorm, and the output head tied to the token embedding. Its vocabulary is the cache's V
and its context the cache's L unless the spec says otherwise (``vocab=``, ``context=``);
``dropout=`` applies after the embeddings, the attention and the MLP.

``hf:CONFIG_DIR``: ``AutoConfig.from_pretrained(dir, local_files_only=True)`` and
``AutoModelForCausalLM.from_config``: fresh weights of that architecture, never remote code.
``transformers`` is imported only for such a spec (the ``lm`` extra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

GPT_PREFIX, HF_PREFIX = "gpt:", "hf:"
STUDENT_FORMS = "gpt:layers=L,dim=D,heads=H[,dropout=P][,vocab=N][,context=N] or hf:CONFIG_DIR (a transformers config directory)"
GPT_KEYS = {"layers": int, "dim": int, "heads": int, "dropout": float, "vocab": int, "context": int}
GPT_REQUIRED = ("layers", "dim", "heads")
INSTALL_HINT = "pip install 'kdcache[lm]'"


class StudentError(ValueError):
    """A student spec that cannot be parsed or built, in one line."""


@dataclass(frozen=True)
class StudentSpec:
    """A parsed ``--student``: ``kind`` "gpt" with its ``params``, or "hf" with its ``directory``."""

    text: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None


def parse_student(text: str) -> StudentSpec:
    """``gpt:layers=2,dim=128,heads=4`` or ``hf:DIR`` → StudentSpec; StudentError naming the forms."""
    text = str(text).strip()
    if text.startswith(HF_PREFIX) and text[len(HF_PREFIX) :]:
        return StudentSpec(text, "hf", directory=Path(text[len(HF_PREFIX) :]))
    if not text.startswith(GPT_PREFIX):
        raise StudentError(f"--task lm takes --student {STUDENT_FORMS}; got {text!r}")
    params: dict[str, Any] = {}
    for item in filter(None, text[len(GPT_PREFIX) :].split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in GPT_KEYS or key in params:
            raise StudentError(f"bad student {text!r} at {item!r}: expected {STUDENT_FORMS}")
        try:
            params[key] = GPT_KEYS[key](value.strip())
        except ValueError:
            raise StudentError(f"bad student {text!r}: {key} must be a number, got {value!r}; expected {STUDENT_FORMS}") from None
    missing = [key for key in GPT_REQUIRED if key not in params]
    if missing:
        raise StudentError(f"bad student {text!r}: missing {', '.join(missing)}; expected {STUDENT_FORMS}")
    if min(params["layers"], params["dim"], params["heads"], params.get("vocab", 1), params.get("context", 1)) < 1:
        raise StudentError(f"bad student {text!r}: layers, dim, heads, vocab and context must be >= 1")
    if params["dim"] % params["heads"]:
        raise StudentError(f"bad student {text!r}: dim {params['dim']} is not a multiple of heads {params['heads']}")
    if not 0.0 <= params.get("dropout", 0.0) < 1.0:
        raise StudentError(f"bad student {text!r}: dropout must lie in [0, 1), got {params['dropout']}")
    return StudentSpec(text, "gpt", params)


# ---------------------------------------------------------------------------------------------
# The built-in GPT


class Block(nn.Module):
    """Pre-LayerNorm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(attended.transpose(1, 2).reshape(batch, length, dim)))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """ids [B, l] → logits [B, l, vocab], l <= ``context``; the head shares the token embedding."""

    def __init__(self, vocab: int, context: int, layers: int, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.vocab_size, self.context = vocab, context
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tokens.weight
        self.apply(_init_weights)
        for block in self.blocks:  # GPT-2: the residual projections scaled by the depth
            for linear in (block.proj, block.mlp[2]):
                nn.init.normal_(linear.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.drop(self.tokens(ids) + self.positions(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------
# transformers students


def import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise StudentError(f"hf: students need transformers: {INSTALL_HINT}") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


class HFStudent(nn.Module):
    """A ``transformers`` causal LM as ids [B, l] → logits [B, l, V']."""

    def __init__(self, model: nn.Module, context: int | None) -> None:
        super().__init__()
        self.model = model
        head = model.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
        self.context = context

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


def context_length(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_hf(spec: StudentSpec) -> HFStudent:
    assert spec.directory is not None
    if not (spec.directory / "config.json").is_file():
        raise StudentError(f"{spec.text}: not a transformers config directory (no {spec.directory / 'config.json'})")
    transformers = import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(spec.directory, local_files_only=True, trust_remote_code=False)
        model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:
        raise StudentError(f"{spec.text}: cannot build a causal language model from it ({type(exc).__name__}: {exc})") from None
    return HFStudent(model.float(), context_length(config))


# ---------------------------------------------------------------------------------------------
# Building


def build_student(spec: StudentSpec, vocab_size: int, context: int) -> nn.Module:
    """The student for a cache of ``vocab_size`` classes and sequences of ``context`` tokens: its
    ``vocab_size`` may differ (``vocab=``, an hf: config; the trainer checks it), its ``context``
    may not be shorter."""
    if spec.kind == "hf":
        model: nn.Module = build_hf(spec)
    else:
        p = spec.params
        model = GPT(p.get("vocab", vocab_size), p.get("context", context), p["layers"], p["dim"], p["heads"], p.get("dropout", 0.0))
    student_context = getattr(model, "context", None)
    if student_context is not None and student_context < context:
        raise StudentError(f"{spec.text}: its context is {student_context} tokens, shorter than the cache's sequences of {context}")
    return model


def save_student(model: nn.Module, directory: Path) -> None:
    """An hf: student's ``save_pretrained(directory)``, which ``AutoModelForCausalLM.from_pretrained`` loads."""
    assert isinstance(model, HFStudent)
    model.model.save_pretrained(str(directory))
