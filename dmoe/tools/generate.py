"""`dmoe generate CHECKPOINT --prompt TEXT`: continue a text with a dmoe checkpoint (one
process, whole model), to check a model before and after a conversion.

    dmoe generate runs/mixtral-tiny --prompt "def main(" --max-new-tokens 64
    dmoe generate runs/mixtral-tiny --prompt "import " --temperature 0.8 --top-k 40 --seed 3
    dmoe generate runs/qwen3 --prompt-ids 1,2,3 --max-new-tokens 8     # ids in, ids out

Greedy (temperature 0, the default) is deterministic. Text is encoded with the run's
tokenizer (dmoe.hf.tokenizer.run_tokenizer: --tokenizer-json, an imported model's own,
the byte tokenizer or the data dir's BPE). Generation stops at --eos-id (default: an
imported model's eos, else dmoe's end-of-text 0; -1: never).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from dmoe.checkpoint.errors import CheckpointError
from dmoe.config import ConfigError
from dmoe.tools.help_format import HelpFormatter, summary


def _stop_ids(eos_id: int | None, checkpoint) -> tuple[int, ...]:
    from dmoe.hf.families import EOT_ID
    from dmoe.hf.tokenizer import source_token_ids

    if eos_id is None:
        eos = source_token_ids(checkpoint).get("eos_token_id", EOT_ID)
        return tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return () if eos_id < 0 else (eos_id,)


def main(argv: list[str]) -> int:
    """Prints the continuation (or its ids) on stdout; errors one line on stderr, exit 2."""
    p = argparse.ArgumentParser(prog="dmoe generate", description=summary(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="checkpoint dir, a run's checkpoints/ dir, or a run dir")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, encoded with the run's tokenizer")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids (prints ids)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest; 0: all")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--eos-id", type=int, default=None,
                   help="stop at this token (default: an imported model's eos, else 0; -1: never)")
    p.add_argument("--tokenizer-json", default=None,
                   help="this tokenizer.json instead of the run's")
    p.add_argument("--json", action="store_true", help="print {prompt_ids, new_ids, text} as JSON")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from dmoe.checkpoint.offline import open_checkpoint
    from dmoe.hf.errors import HFError
    from dmoe.hf.tokenizer import run_tokenizer
    from dmoe.model.from_checkpoint import load_model
    from dmoe.model.generate import generate

    try:
        reader = open_checkpoint(a.checkpoint)
        model = load_model(reader)
        tok = None
        if a.prompt is not None:
            tok = run_tokenizer(model.cfg, reader.dir, a.tokenizer_json)
            ids = [int(i) for i in tok.encode(a.prompt)]
        else:
            ids = [int(i) for i in a.prompt_ids.split(",") if i.strip()]
        bad = [i for i in ids if not 0 <= i < model.cfg.model.vocab_size]
        if bad:
            raise HFError(f"--prompt-ids: id {bad[0]} outside the vocabulary "
                          f"[0, {model.cfg.model.vocab_size})")
        new = generate(model, ids, a.max_new_tokens, a.temperature, a.top_k, a.seed,
                       _stop_ids(a.eos_id, reader.dir))
    except (HFError, CheckpointError, ConfigError, ValueError) as err:
        sys.stderr.write(f"generate error: {err}\n")
        return 2
    text = tok.decode(new) if tok is not None else None
    if a.json:
        sys.stdout.write(json.dumps({"prompt_ids": ids, "new_ids": new, "text": text}) + "\n")
    else:
        sys.stdout.write((text if text is not None else " ".join(map(str, new))) + "\n")
    return 0
