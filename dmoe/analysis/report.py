"""The routing figures of a collected run (dmoe.analysis.collect), and their outputs:

    routing.json        every figure (what the text, HTML and heatmaps show, and more)
    report.txt          per layer: NMI with domain / token / token class against their
                        chance levels, consecutive reuse against chance; loss per domain
    report.html         the same with the heatmaps
    heatmap_block{i}.png  domains x experts: P(expert | domain), and log2 of its ratio to
                        the expert's overall share (labelled axes, colour bars; no cell text,
                        tick labels thinned, so 64+ experts stay readable)
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from . import stats
from .collect import DomainRun


def token_text(tokenizer, vocab_size: int):
    """id -> a short printable string (byte tokens as repr of their character)."""
    def show(i: int) -> str:
        if tokenizer is None or getattr(tokenizer, "vocab_size", None) == 256:
            return repr(chr(i)) if i < 256 else str(i)
        return repr(tokenizer.decode([i]))
    return show


def _layer_figures(block: int, runs: list[DomainRun], num_experts: int, vocab_size: int,
                   classes_of, show) -> dict:
    choices = [r.choices[block] for r in runs]  # [W, S, K] per domain
    k = choices[0].shape[-1]
    flat = np.concatenate([c.reshape(-1, k) for c in choices])
    domain_T = np.concatenate([np.full(c.shape[0] * c.shape[1], d) for d, c in enumerate(choices)])
    token_T = np.concatenate([r.tokens_WS.reshape(-1) for r in runs])
    class_T = np.concatenate([classes_of(r.tokens_WS.reshape(-1)) for r in runs])
    joint = stats.joint_counts(domain_T, flat, len(runs), num_experts)
    usage = joint / np.maximum(joint.sum(1, keepdims=True), 1e-30)
    figures = {"block": block, "top_k": int(k),
               "usage": {r.name: [round(float(x), 6) for x in row] for r, row in zip(runs, usage)},
               "usage_all": [round(float(x), 6) for x in stats.usage_shares(flat, num_experts)]}
    for key, labels in (("domain", domain_T), ("token", token_T), ("token_class", class_T)):
        figures[key] = stats.nmi(labels, flat, num_experts)
        figures[key]["chance_nmi"] = stats.shuffled_nmi(labels, flat, num_experts)
    figures["reuse"] = stats.consecutive_reuse(np.concatenate(choices), num_experts)
    figures["reuse_per_domain"] = {r.name: stats.consecutive_reuse(c, num_experts)
                                   for r, c in zip(runs, choices)}
    tops = stats.top_tokens(token_T, flat, num_experts, vocab_size)
    for t in tops:
        t["frequent"] = [(show(i), s) for i, s in t["frequent"]]
        t["lift"] = [(show(i), s) for i, s in t["lift"]]
    figures["top_tokens"] = tops
    return figures


def analyze(runs: list[DomainRun], num_experts: int, vocab_size: int, tokenizer=None,
            byte_tokens: bool = True) -> dict:
    """Every figure of the routing analysis, as a JSON-ready dict."""
    show = token_text(tokenizer, vocab_size)
    if byte_tokens:
        classes_of = stats.byte_token_classes
    else:
        def classes_of(ids):
            return stats.piece_token_classes([tokenizer.decode([int(i)]) for i in ids])
    out = {"domains": [r.name for r in runs], "num_experts": num_experts,
           "tokens": {r.name: int(r.tokens_WS.size) for r in runs},
           "loss": {r.name: round(r.loss, 6) for r in runs},
           "token_classes": list(stats.TOKEN_CLASSES)}
    out["loss_mean"] = round(float(np.mean(list(out["loss"].values()))), 6) if runs else None
    blocks = sorted(runs[0].choices) if runs else []
    out["layers"] = [_layer_figures(b, runs, num_experts, vocab_size, classes_of, show)
                     for b in blocks]
    return out


def heatmap(layer: dict, domains: list[str], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usage = np.array([layer["usage"][d] for d in domains])
    overall = np.maximum(np.array(layer["usage_all"]), 1e-12)
    lift = np.log2(np.maximum(usage, 1e-6) / overall)
    experts = usage.shape[1]
    width = min(6 + experts * 0.12, 16)  # the panels stacked: wide expert axes stay legible
    fig, axes = plt.subplots(2, 1, figsize=(width, 2.6 + 0.9 * len(domains)),
                             constrained_layout=True)
    # fixed floors on the colour ranges, so that near-uniform routing looks near-uniform:
    # usage up to at least 2 / E, lift to at least a factor 2 either way
    bound = max(float(np.abs(lift).max()), 1.0)
    panels = ((usage, "viridis", 0, max(float(usage.max()), 2 / experts), "P(expert | domain)"),
              (lift, "RdBu_r", -bound, bound, "log2 P(expert | domain) / P(expert)"))
    step = max(1, experts // 16)
    for ax, (values, cmap, lo, hi, label) in zip(axes, panels):
        im = ax.imshow(values, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_xticks(range(0, experts, step))
        ax.set_yticks(range(len(domains)), domains)
        ax.set_xlabel("expert")
        ax.set_ylabel("domain")
        ax.set_title(label, fontsize=10)
        fig.colorbar(im, ax=ax, label=label)
    fig.suptitle(title or f"block {layer['block']}: NMI(domain, expert) = {layer['domain']['nmi']:.3f}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def text_report(result: dict) -> str:
    lines = [f"routing analysis of {result.get('checkpoint', '?')} (step {result.get('step', '?')})",
             "validation loss per domain (nats/token): " + ", ".join(
                 f"{d} {v:.3f}" for d, v in result["loss"].items()) + f"; mean {result['loss_mean']}"]
    for layer in result["layers"]:
        r = layer["reuse"]
        lines.append(
            f"block {layer['block']} ({result['num_experts']} experts, top-{layer['top_k']}): "
            + ", ".join(f"NMI {key.replace('_', ' ')} {layer[key]['nmi']:.3f} "
                        f"(chance {layer[key]['chance_nmi']:.3f})"
                        for key in ("domain", "token", "token_class"))
            + f"; consecutive reuse {r['rate']:.3f} vs chance {r['chance']:.3f} ({r['ratio']:.2f}x)")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> list[Path]:
    """routing.json, report.txt, report.html and one heatmap per MoE layer into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(result, indent=1))
    text = text_report(result)
    (out / "report.txt").write_text(text)
    images = []
    for layer in result["layers"]:
        path = out / f"heatmap_block{layer['block']}.png"
        heatmap(layer, result["domains"], path)
        images.append(path)
    body = "".join(f"<p>{html.escape(line)}</p>" for line in text.splitlines())
    body += "".join(f'<img src="{p.name}" style="max-width:100%">' for p in images)
    (out / "report.html").write_text(f"<html><head><meta charset='utf-8'><title>routing "
                                     f"analysis</title></head><body>{body}</body></html>")
    return [out / "routing.json", out / "report.txt", out / "report.html", *images]
