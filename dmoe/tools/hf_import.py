"""`dmoe import HF_DIR RUN_DIR [--config FILE] [--section.key=value ...]` (module named
hf_import: `import` is a Python keyword): a Hugging Face checkpoint (mixtral, qwen2_moe,
qwen3_moe; dense llama, qwen2, qwen3) becomes a dmoe run directory whose checkpoint any
layout resumes:

    dmoe import ~/models/Qwen1.5-MoE-A2.7B runs/qwen2-moe --train.lr=1e-4
    deepspeed --num_gpus 8 launch/train.py --config runs/qwen2-moe/config.yaml \\
        --train.resume=runs/qwen2-moe --parallel.ep=4

The architecture comes from config.json; --config FILE and the overrides add training,
data and parallel settings (dmoe.hf.importer).
"""
from __future__ import annotations

import argparse
import logging
import sys

from dmoe.checkpoint.errors import CheckpointError
from dmoe.config import ConfigError
from dmoe.tools.help_format import HelpFormatter, summary


def main(argv: list[str]) -> int:
    """Errors are one line on stderr, exit 2; nothing is left in RUN_DIR."""
    p = argparse.ArgumentParser(prog="dmoe import", description=summary(__doc__),
                                formatter_class=HelpFormatter,
                                epilog="any other --section.key=value is a config override")
    p.add_argument("hf_dir", help="an HF model directory: config.json + safetensors weights")
    p.add_argument("run_dir", help="new (or empty) dmoe run directory")
    p.add_argument("--config", default=None, help="base config for training/data/parallel settings")
    a, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dmoe.hf.errors import HFError
    from dmoe.hf.importer import import_hf

    try:
        import_hf(a.hf_dir, a.run_dir, overrides, a.config)
    except (HFError, CheckpointError, ConfigError) as err:
        sys.stderr.write(f"import error: {err}\n")
        return 2
    return 0
