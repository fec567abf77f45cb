"""Tokenizers in and out of Hugging Face form, with the package `tokenizers` only.

Export writes tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast) so that
transformers' AutoTokenizer loads it, chosen in this order:
    1. --tokenizer-json FILE                       that file
    2. RUN_DIR/hf_files/ (an imported model)      the source checkpoint's tokenizer files
    3. data.tokenizer byte                         a byte-level BPE with 256 tokens, id =
                                                   byte value, no merges (GPT-2's byte ->
                                                   character table), so encode(text) gives
                                                   text's UTF-8 bytes: dmoe's ByteTokenizer
    4. data.tokenizer bpe                          data.data_dir/tokenizer.json, as trained
dmoe's end-of-text id (0, which data preparation puts between documents) is the
generation config's eos_token_id, not a special token: a special token would be matched
inside text and change the byte ids.

`run_tokenizer` gives `dmoe generate` the same choice (encode/decode of ids).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from dmoe.config import Config
from dmoe.data.tokenizer import BPETokenizer, ByteTokenizer

from .errors import HFError

log = logging.getLogger(__name__)

HF_FILES = "hf_files"  # in an imported run dir: the source's tokenizer and generation files
CARRIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
           "chat_template.jinja", "generation_config.json")
SOURCE_CONFIG = "source_config.json"  # the source's config.json (its token ids)


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def byte_tokenizer_json() -> str:
    """A `tokenizers` JSON whose ids are UTF-8 bytes (dmoe's ByteTokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: b for b, char in _byte_to_char().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def run_dir_of(checkpoint: Path) -> Path | None:
    """RUN_DIR of RUN_DIR/checkpoints/step_N, else None."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def hf_files_of(checkpoint: Path) -> Path | None:
    run = run_dir_of(checkpoint)
    return run / HF_FILES if run is not None and (run / HF_FILES).is_dir() else None


def carry_in(hf_dir: Path, run_dir: Path) -> None:
    """Keep an imported checkpoint's tokenizer and generation files in RUN_DIR/hf_files."""
    out = run_dir / HF_FILES
    out.mkdir()
    for name in CARRIED:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / name)
    shutil.copy2(hf_dir / "config.json", out / SOURCE_CONFIG)


def source_token_ids(checkpoint: Path) -> dict:
    """bos/eos/pad ids of an imported model's source config.json ({} for a dmoe model)."""
    files = hf_files_of(checkpoint)
    if files is None or not (files / SOURCE_CONFIG).is_file():
        return {}
    source = json.loads((files / SOURCE_CONFIG).read_text())
    return {k: source.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _tokenizer_source(cfg: Config, checkpoint: Path, tokenizer_json: str | None
                      ) -> tuple[str, Path | None]:
    """("file", path) | ("hf_files", dir) | ("byte", None)."""
    if tokenizer_json:
        path = Path(tokenizer_json)
        if not path.is_file():
            raise HFError(f"{path}: no such tokenizer file (--tokenizer-json)")
        return "file", path
    files = hf_files_of(checkpoint)
    if files is not None:
        return "hf_files", files
    if cfg.data.tokenizer == "byte":
        return "byte", None
    path = Path(cfg.data.data_dir) / "tokenizer.json"
    if not path.is_file():
        raise HFError(f"{path}: missing (data.tokenizer bpe, data.data_dir {cfg.data.data_dir}); "
                      "run from the training directory or pass --tokenizer-json")
    return "file", path


def write_hf_tokenizer(out: Path, cfg: Config, checkpoint: Path,
                       tokenizer_json: str | None) -> None:
    kind, path = _tokenizer_source(cfg, checkpoint, tokenizer_json)
    if kind == "hf_files":
        copied = [name for name in CARRIED
                  if name != "generation_config.json" and (path / name).is_file()]
        for name in copied:
            shutil.copy2(path / name, out / name)
        if not copied:
            log.warning("%s: the imported checkpoint came without tokenizer files; the export "
                        "has none (pass --tokenizer-json to add one)", path)
        return
    text = byte_tokenizer_json() if kind == "byte" else path.read_text()
    vocab = json.loads(text).get("model", {}).get("vocab", {})
    if len(vocab) > cfg.model.vocab_size:
        raise HFError(f"{path or 'byte tokenizer'}: {len(vocab)} tokens, more than "
                      f"model.vocab_size ({cfg.model.vocab_size})")
    (out / "tokenizer.json").write_text(text)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.model.seq_len,
        "clean_up_tokenization_spaces": False,
    }, indent=2))


def run_tokenizer(cfg: Config, checkpoint: Path, tokenizer_json: str | None = None):
    """encode(text) / decode(ids) for a checkpoint, by the same choice as the export."""
    kind, path = _tokenizer_source(cfg, checkpoint, tokenizer_json)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf_files":
        if not (path / "tokenizer.json").is_file():
            raise HFError(f"{path}: no tokenizer.json (the source had none); pass "
                          "--tokenizer-json or --prompt-ids")
        path = path / "tokenizer.json"
    return BPETokenizer(path)
