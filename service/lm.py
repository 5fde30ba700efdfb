"""A causal language model as a teacher member: ``--teacher hf:DIR``.

``DIR`` is a Hugging Face ``transformers`` model directory (``save_pretrained``), loaded with
``AutoModelForCausalLM`` from local files only and without remote code: a directory is data, and
``trust_remote_code`` would import the Python files it holds. A tokenizer saved in the same
directory is fingerprinted with the weights (its files' sha256), and the cache records that
fingerprint apart (``tokenizer_fingerprint``): token ids mean something only in their tokenizer.

The member takes token ids [B, L] (int64) and returns logits [B, L, V]. Sequences are padded on
the right, so no attention mask is needed: a causal model's logits at a position depend on the
tokens up to it only, and the padding comes after every valid position. ``L`` (the longest
sequence the cache holds) is ``input_shape`` when given (``--input-shape 128``), else the model's
context (``max_position_embeddings`` or ``n_positions``). A ``.pt2`` program or a
``module:factory`` with int64 inputs (``--input-dtype int64 --input-shape L``) that returns
[B, L, V] logits is served the same way.

``transformers`` is imported here only, and only for an ``hf:`` spec: it is the ``lm`` extra.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..offline import models
from ..offline.cache import Preprocessing
from ..offline.models import describe_error
from .contract import InputContract, Overrides, TeacherError

PREFIX = "hf:"
TOKEN_DTYPE = "int64"
# The files of a saved tokenizer; those present are fingerprinted, in this order.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")


class CausalLM(nn.Module):
    """A ``transformers`` causal LM as ids [B, L] → logits [B, L, V]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def tokenizer_fingerprint(directory: Path) -> str | None:
    """sha256 over the tokenizer files present in ``directory`` (names and bytes); None without any."""
    digest, found = hashlib.sha256(), False
    for name in TOKENIZER_FILES:
        path = directory / name
        if path.is_file():
            found = True
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest() if found else None


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise TeacherError("hf: teachers need transformers: pip install 'kdcache[lm]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def context_length(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_hf(spec: str, options: Overrides) -> tuple[nn.Module, str, InputContract, int, str | None]:
    """(module, fingerprint, contract, vocabulary size, tokenizer fingerprint) of ``hf:DIR``."""
    directory = Path(spec[len(PREFIX) :])
    if not (directory / "config.json").is_file():
        raise TeacherError(f"{spec}: not a transformers model directory (no {directory / 'config.json'})")
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, config=config, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise TeacherError(f"{spec}: cannot load it as a causal language model ({describe_error(exc)})") from None
    context = context_length(config)
    if options.input_shape is not None:
        if len(options.input_shape) != 1:
            raise TeacherError(f"{spec}: input_shape of a language model is one number, the longest sequence, got {list(options.input_shape)}")
        length = int(options.input_shape[0])
        if context is not None and length > context:
            raise TeacherError(f"{spec}: input_shape {length} is beyond the model's context of {context} tokens", setting="input_shape")
    elif context is None:
        raise TeacherError(f"{spec}: its config names no context length; give the longest sequence as input_shape", setting="input_shape")
    else:
        length = context
    if options.input_dtype not in (None, TOKEN_DTYPE) or options.normalize is not None or options.input_scale not in (None, 1.0):
        raise TeacherError(f"{spec}: a language model takes int64 token ids as they are (no input dtype, scale or normalisation)")
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else int(config.vocab_size)
    module = CausalLM(model.float())
    tokenizer = tokenizer_fingerprint(directory)
    digest = hashlib.sha256(models.weights_fingerprint(module.state_dict()).encode())
    digest.update(b"tokenizer:" + (tokenizer or "none").encode())
    contract = InputContract((length,), TOKEN_DTYPE, Preprocessing())
    return module, digest.hexdigest(), contract, vocab, tokenizer
