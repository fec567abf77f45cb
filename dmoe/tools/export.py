"""`dmoe export SRC OUT --format hf|dmoe`: a trained model out of dmoe.

    dmoe export runs/mixtral-tiny out/mixtral-tiny --format hf [--dtype bfloat16]
        OUT: a Hugging Face model directory (dmoe.hf.exporter): transformers'
        AutoModelForCausalLM / AutoTokenizer load it; refused, with the option named, when
        no HF family expresses the architecture
    dmoe export runs/mixtral-tiny model.safetensors --format dmoe
        OUT: one safetensors file of whole parameters, dmoe's names (= dmoe checkpoint export)
"""
from __future__ import annotations

import argparse
import logging
import sys

from dmoe.checkpoint.errors import CheckpointError
from dmoe.config import ConfigError
from dmoe.tools.help_format import HelpFormatter, summary


def main(argv: list[str]) -> int:
    """Errors are one line on stderr, exit 2."""
    p = argparse.ArgumentParser(prog="dmoe export", description=summary(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("src", help="checkpoint dir, a run's checkpoints/ dir or a run dir (its latest)")
    p.add_argument("out", help="hf: new output directory; dmoe: output .safetensors file")
    p.add_argument("--format", choices=["hf", "dmoe"], default="hf",
                   help="hf: a Hugging Face model directory; dmoe: one safetensors file")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default=None,
                   help="hf default float32 (dmoe's master weights)")
    p.add_argument("--max-shard-size", default="5GB", help="hf: split above this (5GB, 500MB, ...)")
    p.add_argument("--tokenizer-json", default=None,
                   help="hf: this tokenizer.json instead of the run's (byte / data_dir BPE)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dmoe.hf.errors import HFError

    try:
        if a.format == "hf":
            from dmoe.hf.exporter import export_hf

            export_hf(a.src, a.out, a.dtype or "float32", a.max_shard_size, a.tokenizer_json)
        else:
            from dmoe.checkpoint.offline import export

            export(a.src, a.out, a.dtype)
    except (HFError, CheckpointError, ConfigError) as err:
        sys.stderr.write(f"export error: {err}\n")
        return 2
    return 0
