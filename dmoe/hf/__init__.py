"""Hugging Face in and out: `dmoe import`, `dmoe export --format hf`. Needs no transformers
(safetensors, tokenizers and JSON only); transformers (`pip install dmoe[hf]`) is what
loads the result, and what the tests check it against.

    errors.py              HFError (one line naming the file, tensor or option)
    hf_checkpoint.py       an HF directory read tensor by tensor (single file or index)
    families.py            config.json <-> dmoe options; which family expresses a config
    weights.py             dmoe parameter <-> HF tensor names and reshapes
    safetensors_stream.py  a safetensors file written tensor by tensor
    tokenizer.py           tokenizer files out (byte-level / BPE / carried) and for generate
    importer.py            HF dir -> dmoe run dir (a 1-rank checkpoint, params only)
    exporter.py            dmoe checkpoint -> HF dir
"""
