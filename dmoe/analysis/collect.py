"""Run a whole model on one process over each domain's validation tokens and record every
MoE layer's expert choices and the per-domain loss. No process group: the checkpoint is
assembled to one rank on load (dmoe.model.from_checkpoint), so any saved layout, and an
imported Hugging Face model, is analysed the same way.

Shape legend: W windows, S sequence length, K top-k, V vocabulary.

Each domain gives up to `tokens_per_domain` tokens of its validation documents (in their
order, documents joined by the end-of-text separator), cut into non-overlapping windows of
S + 1 tokens: inputs the first S, targets the last S. Windows never mix domains.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dmoe.data.token_files import TokenData
from dmoe.data.tokenizer import ByteTokenizer
from dmoe.moe.layer import MoELayer

log = logging.getLogger(__name__)


@dataclass
class DomainRun:
    """One domain's windows and what the model did on them."""

    name: str
    tokens_WS: np.ndarray  # int64 inputs
    loss_sum: float = 0.0  # nats, summed over predicted tokens
    choices: dict[int, np.ndarray] = field(default_factory=dict)  # block -> [W, S, K]

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens_WS.size, 1)


def domain_windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    """[W, S + 1] non-overlapping windows of the first max_tokens (+1) tokens."""
    n = min((len(tokens) - 1) // seq_len, max(max_tokens // seq_len, 1))
    if n < 1:
        return np.zeros((0, seq_len + 1), dtype=np.int64)
    flat = np.asarray(tokens[: n * seq_len + 1], dtype=np.int64)
    return np.stack([flat[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])


def retokenize(tokens: np.ndarray, tokenizer) -> np.ndarray:
    """Byte tokens (data prepared with the byte tokenizer) re-encoded with `tokenizer`,
    document by document (the end-of-text byte 0 stays the separator)."""
    docs = bytes(np.asarray(tokens, dtype=np.uint8)).split(b"\0")
    parts = []
    for doc in docs:
        parts += [np.asarray(tokenizer.encode(doc.decode("utf-8", errors="replace")),
                             dtype=np.int64), np.zeros(1, dtype=np.int64)]
    return np.concatenate(parts)[:-1] if parts else np.zeros(0, dtype=np.int64)


def moe_layers(model) -> dict[int, MoELayer]:
    return {i: b.ffn for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)}


@torch.no_grad()
def run_domains(model, data: TokenData, tokens_per_domain: int, batch_size: int = 16,
                tokenizer=None, data_is_byte: bool = True) -> list[DomainRun]:
    """Every domain's windows through `model` (eval mode), choices recorded per MoE layer.

    tokenizer: the model's (encode); when the data is byte tokens and the model's tokenizer
    is another, each domain's text is re-encoded with it first."""
    seq_len, vocab = model.cfg.model.seq_len, model.cfg.model.vocab_size
    layers, runs = moe_layers(model), []
    recode = tokenizer is not None and data_is_byte and not isinstance(tokenizer, ByteTokenizer)
    for d, name in enumerate(data.domains):
        tokens = data.domain_tokens("val", d)
        if recode:
            tokens = retokenize(tokens, tokenizer)
        windows = domain_windows(tokens, seq_len, tokens_per_domain)
        if len(windows) == 0:
            log.warning("domain %r: fewer than %d validation tokens, left out", name, seq_len + 1)
            continue
        if windows.max() >= vocab:
            raise ValueError(f"domain {name!r}: token id {int(windows.max())} is outside the "
                             f"model's vocabulary ({vocab}); tokenize the data with its tokenizer")
        runs.append(_run_one(model, layers, DomainRun(name, windows[:, :-1]), windows, batch_size))
    return runs


def _run_one(model, layers: dict, run: DomainRun, windows: np.ndarray, batch_size: int) -> DomainRun:
    seen: dict[int, list] = {i: [] for i in layers}
    for i, layer in layers.items():
        layer.routing_observer = seen[i].append
    try:
        device = next(model.parameters()).device
        for start in range(0, len(windows), batch_size):
            w = torch.from_numpy(windows[start: start + batch_size]).to(device)
            logits = model(w[:, :-1]).logits
            run.loss_sum += float(F.cross_entropy(logits.flatten(0, 1).double(), w[:, 1:].flatten(),
                                                  reduction="sum"))
    finally:
        for layer in layers.values():
            layer.routing_observer = None
    w_count, s = run.tokens_WS.shape
    for i, parts in seen.items():
        run.choices[i] = torch.cat(parts).cpu().numpy().reshape(w_count, s, -1)
    return run
