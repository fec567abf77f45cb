"""Routing analysis and upcycled checkpoints across layouts: the analysis of a checkpoint
saved by a forked dp2·ep2 run equals the analysis of the same checkpoint resharded offline
to one rank (every figure in the JSON), and an upcycled checkpoint (one rank, parameters
only) trains under ep2 with the loss of one process."""
import json

import numpy as np
import torch

from dmoe.checkpoint.load import load_checkpoint
from dmoe.checkpoint.offline import reshard
from dmoe.checkpoint.save import save_checkpoint
from dmoe.checkpoint.whole import write_run_dir
from dmoe.config import load_config
from dmoe.model.from_checkpoint import model_from_checkpoint
from dmoe.model.upcycle import moe_config, upcycle
from dmoe.parallel.layout import ParallelLayout, build_process_groups
from dmoe.parallel.parallelize import parallelize
from dmoe.tools.analyze_routing import analyze_checkpoint
from dmoe.train.engines import TorchEngine
from tests._dist import run_ranks

from .equivalence import SEQ, VOCAB, build_full_model, tiny_config

DROPLESS = ["--moe.capacity_factor=null", "--moe.eval_capacity_factor=null"]


def _data_dir(path):
    """Three domains of random validation tokens below VOCAB, in the prepared layout."""
    rng = np.random.default_rng(0)
    index, parts, at = [], [], 0
    for d in range(3):
        for _ in range(2):
            doc = rng.integers(1, VOCAB, 60 + 7 * d).astype(np.uint16)
            index.append((at, d))
            parts.append(doc)
            at += len(doc)
    path.mkdir()
    tokens = np.concatenate(parts)
    for split in ("train", "val"):
        tokens.tofile(path / f"{split}.bin")
        np.save(path / f"{split}.idx.npy", np.asarray(index, dtype=np.int64))
    (path / "meta.json").write_text(json.dumps({"vocab_size": VOCAB, "domains": ["a", "b", "c"],
                                                "source": {"tokenizer": "byte"}}))
    return path


def _save_dp2_ep2(rank, world, run_dir):
    cfg = tiny_config(1, 2, [f"--train.run_dir={run_dir}"])
    groups = build_process_groups(ParallelLayout(world, tp=1, ep=2), rank)
    engine = TorchEngine(parallelize(build_full_model(cfg), groups), cfg, groups)
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
    out = engine.forward(x[:, :-1], x[:, 1:])
    engine.backward(out.loss)
    engine.step(cfg.train.lr)
    return str(save_checkpoint(engine, cfg, groups, step=1))


def test_analysis_of_dp2_ep2_checkpoint_equals_resharded_one_rank(tmp_path):
    saved = run_ranks(_save_dp2_ep2, 4, args=(str(tmp_path / "run"),))[0]
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "step_000001" / "manifest.json")
                          .read_text())
    assert (manifest["layout"]["world_size"], manifest["layout"]["ep"]) == (4, 2)  # dp2·ep2
    one = reshard(saved, str(tmp_path / "one"), world_size=1)
    data = _data_dir(tmp_path / "data")
    a = analyze_checkpoint(saved, str(data), tokens_per_domain=64, batch_size=3)
    b = analyze_checkpoint(str(one), str(data), tokens_per_domain=64, batch_size=3)
    for r in (a, b):
        r.pop("checkpoint")
    assert a["layers"] and a["domains"] == ["a", "b", "c"]
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _loss_under_ep2(rank, world, ckpt):
    cfg = load_config(f"{ckpt}/config.yaml", ["--parallel.ep=2"])
    groups = build_process_groups(ParallelLayout(world, tp=1, ep=2), rank)
    engine = TorchEngine(parallelize(build_full_model(cfg), groups), cfg, groups)
    load_checkpoint(engine, groups, ckpt)
    x = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return float(engine.module(x[:, :-1], x[:, 1:]).ce_loss)


def test_upcycled_checkpoint_loads_under_ep2(tmp_path):
    dense_cfg = tiny_config(1, 1, ["--moe.first_dense_layers=2"])
    dense = build_full_model(dense_cfg)
    cfg = moe_config(dense_cfg, 4, 2, 1, DROPLESS)
    tensors = upcycle({n: p.detach() for n, p in dense.named_parameters()}, cfg, noise=0.05)
    run = write_run_dir(tmp_path / "up", cfg, tensors)
    ckpt = run / "checkpoints" / "step_000000"
    losses = run_ranks(_loss_under_ep2, 2, args=(str(ckpt),))
    model = model_from_checkpoint(str(run), torch.float64)
    x = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = float(model(x[:, :-1], x[:, 1:]).ce_loss)
    assert max(abs(v - want) for v in losses) < 1e-12
