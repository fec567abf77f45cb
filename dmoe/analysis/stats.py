"""Routing figures as pure functions (numpy; no model, no process group).

Shape legend: T tokens, K top-k, E experts, L labels (domains, token ids or classes).
Every function takes expert_idx_TK (each token's K chosen experts) and per-token labels;
a token's K choices count 1/K each, so each token weighs 1 whatever K.

Normalized mutual information (NMI) between a label and the chosen expert:
    NMI = I(label; expert) / mean(H(label), H(expert))        (arithmetic mean, as sklearn)
0 when the choice is independent of the label, 1 when under top-1 each label has experts
of its own. Under top-k a token's k choices spread over k experts, so H(expert) exceeds
H(label) by up to log2 k bits even when the label fixes the experts (NMI then
2 H(label) / (2 H(label) + log2 k)); `u` = I / H(label), the share of the label's
information an expert choice carries, is 1 in that case for any k. Plug-in estimates are biased upwards by about
(L-1)(E-1) / (2 T ln 2) bits, which matters for token identity (L up to the vocabulary):
`shuffled_nmi` gives the same estimate with the labels permuted (the chance level).

Consecutive reuse: the mean over adjacent token pairs (within a sequence) of
|experts(t) & experts(t+1)| / K. If tokens chose independently from the usage shares p_e
(share of all assignments, sum 1), a token holds expert e with probability K p_e, so the
chance rate is sum_e (K p_e)^2 / K = K * sum_e p_e^2 (1/E for k-of-E uniform routing).
"""
from __future__ import annotations

import keyword
import re

import numpy as np

TOKEN_CLASSES = ("letter", "digit", "whitespace", "punctuation", "keyword", "other")


def joint_counts(labels_T: np.ndarray, expert_idx_TK: np.ndarray, num_labels: int,
                 num_experts: int) -> np.ndarray:
    """[L, E] assignments, each token's K choices weighing 1/K."""
    k = expert_idx_TK.shape[1]
    flat = np.repeat(labels_T.astype(np.int64), k) * num_experts + expert_idx_TK.reshape(-1)
    counts = np.bincount(flat, minlength=num_labels * num_experts).astype(np.float64) / k
    return counts.reshape(num_labels, num_experts)


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def mutual_information(joint_LE: np.ndarray) -> dict:
    """I, H(label), H(expert) in bits, NMI and u = I / H(label) of a joint count table."""
    total = joint_LE.sum()
    if total <= 0:
        return {"mi_bits": 0.0, "h_label_bits": 0.0, "h_expert_bits": 0.0, "nmi": 0.0, "u": 0.0}
    p = joint_LE / total
    h_l, h_e = _entropy_bits(p.sum(1)), _entropy_bits(p.sum(0))
    mi = max(h_l + h_e - _entropy_bits(p.reshape(-1)), 0.0)
    denom = (h_l + h_e) / 2
    return {"mi_bits": mi, "h_label_bits": h_l, "h_expert_bits": h_e,
            "nmi": mi / denom if denom > 0 else 0.0, "u": mi / h_l if h_l > 0 else 0.0}


def nmi(labels_T: np.ndarray, expert_idx_TK: np.ndarray, num_experts: int) -> dict:
    """mutual_information of labels (any non-negative ints) against the chosen experts."""
    _, dense = np.unique(labels_T, return_inverse=True)
    return mutual_information(joint_counts(dense, expert_idx_TK, int(dense.max(initial=-1)) + 1,
                                           num_experts))


def shuffled_nmi(labels_T: np.ndarray, expert_idx_TK: np.ndarray, num_experts: int,
                 seed: int = 0) -> float:
    """NMI with the labels permuted: the estimator's chance level for this many tokens."""
    perm = np.random.default_rng(seed).permutation(len(labels_T))
    return nmi(labels_T[perm], expert_idx_TK, num_experts)["nmi"]


def usage_shares(expert_idx_TK: np.ndarray, num_experts: int) -> np.ndarray:
    """p_e: each expert's share of all assignments (sum 1)."""
    counts = np.bincount(expert_idx_TK.reshape(-1), minlength=num_experts).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def consecutive_reuse(expert_idx_BSK: np.ndarray, num_experts: int) -> dict:
    """Reuse rate of adjacent tokens in each sequence [B, S, K] and its chance rate."""
    b, s, k = expert_idx_BSK.shape
    if s < 2 or b == 0:
        return {"rate": 0.0, "chance": 0.0, "ratio": 0.0, "pairs": 0}
    onehot = np.zeros((b, s, num_experts), dtype=np.int8)
    np.put_along_axis(onehot, expert_idx_BSK.astype(np.int64), 1, axis=2)
    shared = (onehot[:, 1:] & onehot[:, :-1]).sum(-1)  # [B, S-1] experts kept
    rate = float(shared.mean() / k)
    chance = float(k * np.square(usage_shares(expert_idx_BSK, num_experts)).sum())
    return {"rate": rate, "chance": chance, "ratio": rate / chance if chance else 0.0,
            "pairs": int(shared.size)}


def top_tokens(token_T: np.ndarray, expert_idx_TK: np.ndarray, num_experts: int,
               vocab_size: int, n: int = 8, min_count: int = 20) -> list[dict]:
    """Per expert: its most frequent tokens, and the tokens it takes most above their
    base rate (lift = P(token | expert) / P(token), among tokens seen min_count times)."""
    joint = joint_counts(token_T, expert_idx_TK, vocab_size, num_experts)  # [V, E]
    base = joint.sum(1) / max(joint.sum(), 1.0)
    out = []
    for e in range(num_experts):
        col = joint[:, e]
        share = col / max(col.sum(), 1.0)
        lift = np.where((joint.sum(1) >= min_count) & (base > 0), share / np.maximum(base, 1e-30), 0.0)
        frequent = [int(t) for t in np.argsort(-col, kind="stable")[:n] if col[t] > 0]
        lifted = [int(t) for t in np.argsort(-lift, kind="stable")[:n] if lift[t] > 0]
        out.append({"expert": e, "assignments": float(col.sum()),
                    "frequent": [(t, round(float(share[t]), 4)) for t in frequent],
                    "lift": [(t, round(float(lift[t]), 2)) for t in lifted]})
    return out


def _char_class(ch: str) -> int:
    if ch.isalpha() or ch == "_":
        return 0
    if ch.isdigit():
        return 1
    if ch.isspace():
        return 2
    if ch.isprintable() and ch.isascii():
        return 3
    return 5


_KEYWORDS = re.compile(rb"\b(?:" + b"|".join(k.encode() for k in keyword.kwlist) + rb")\b")


def byte_token_classes(tokens_T: np.ndarray) -> np.ndarray:
    """Class id (TOKEN_CLASSES) of each byte token; the bytes of a Python keyword standing
    as a whole word (`def`, `return`, ...) are "keyword". Non-ASCII bytes: "other"."""
    table = np.array([_char_class(chr(b)) if b < 128 else 5 for b in range(256)], dtype=np.int64)
    classes = table[np.clip(tokens_T.astype(np.int64), 0, 255)]
    text = np.clip(tokens_T, 0, 255).astype(np.uint8).tobytes()
    for m in _KEYWORDS.finditer(text):
        classes[m.start():m.end()] = 4
    return classes


def piece_token_classes(pieces: list[str]) -> np.ndarray:
    """Class id of each token from its text (subword tokenizers): a keyword when the piece
    stripped of spaces is one, else the class of its first non-space character."""
    out = []
    for piece in pieces:
        word = piece.strip().lstrip("Ġ▁")
        if word in keyword.kwlist:
            out.append(4)
        elif not word:
            out.append(2)
        else:
            out.append(_char_class(word[0]))
    return np.asarray(out, dtype=np.int64)
