"""`dmoe analyze-routing CHECKPOINT --data DATA_DIR [--out DIR]`: which experts each
domain's tokens choose, per MoE layer, and the per-domain validation loss.

    dmoe data prepare --builtin multidomain --out data/multidomain
    dmoe analyze-routing runs/btx/a_moe --data data/multidomain --out runs/btx/analysis/a

CHECKPOINT: a checkpoint, a run's checkpoints/ dir or a run dir (its latest), saved under
any layout or imported from Hugging Face: it is assembled to one process on load. DATA_DIR:
a prepared data dir with domain labels (`dmoe data prepare`; each given path is a domain).
Writes routing.json, report.txt, report.html and heatmap_block{i}.png (dmoe.analysis.report).
A dense model gets the per-domain loss only. Errors: one line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dmoe.tools.help_format import HelpFormatter, summary


def analyze_checkpoint(checkpoint: str, data_dir: str, tokens_per_domain: int = 16384,
                       batch_size: int = 16, tokenizer_json: str | None = None,
                       dtype: str = "float32") -> dict:
    import torch

    from dmoe.analysis.collect import run_domains
    from dmoe.analysis.report import analyze
    from dmoe.checkpoint.offline import open_checkpoint
    from dmoe.data.token_files import TokenData
    from dmoe.data.tokenizer import BPETokenizer, ByteTokenizer
    from dmoe.hf.tokenizer import hf_files_of, run_tokenizer
    from dmoe.model.from_checkpoint import load_model

    reader = open_checkpoint(checkpoint)
    model = load_model(reader, getattr(torch, dtype))
    data = TokenData.open(Path(data_dir))
    if data.index is None or not data.domains:
        raise ValueError(f"{data_dir}: no per-document domain index; prepare it again "
                         "(dmoe data prepare)")
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    data_is_byte = meta["source"]["tokenizer"] == "byte"
    if not (tokenizer_json or hf_files_of(reader.dir)) and not data_is_byte:
        tok = BPETokenizer(Path(data_dir) / "tokenizer.json")  # the data's own tokens
    else:  # the model's tokenizer; byte data is re-encoded with it when it is another
        tok = run_tokenizer(model.cfg, reader.dir, tokenizer_json)
    runs = run_domains(model, data, tokens_per_domain, batch_size, tok, data_is_byte)
    if not runs:
        raise ValueError(f"{data_dir}: no domain has a full window of validation tokens")
    byte_tokens = isinstance(tok, ByteTokenizer)
    result = analyze(runs, model.cfg.moe.num_experts, model.cfg.model.vocab_size, tok, byte_tokens)
    result.update(checkpoint=str(reader.dir), step=reader.manifest["step"], data=str(data_dir))
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dmoe analyze-routing", description=summary(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoint",
                   help="a checkpoint, a run's checkpoints/ dir or a run dir (its latest)")
    p.add_argument("--data", required=True, help="prepared data dir with domain labels")
    p.add_argument("--out", default=None, help="output dir (default: RUN/analysis)")
    p.add_argument("--tokens-per-domain", type=int, default=16384,
                   help="validation tokens routed per domain")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    p.add_argument("--tokenizer-json", default=None,
                   help="this tokenizer.json instead of the run's")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="the model's dtype")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dmoe.analysis.report import text_report, write_outputs
    from dmoe.checkpoint.errors import CheckpointError
    from dmoe.config import ConfigError
    from dmoe.hf.errors import HFError

    try:
        result = analyze_checkpoint(a.checkpoint, a.data, a.tokens_per_domain, a.batch_size,
                                    a.tokenizer_json, a.dtype)
    except (CheckpointError, ConfigError, HFError, ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"analyze-routing error: {err}\n")
        return 2
    out = Path(a.out) if a.out else Path(result["checkpoint"]).parent.parent / "analysis"
    write_outputs(result, out)
    sys.stdout.write(text_report(result) + f"wrote {out}/\n")
    return 0
