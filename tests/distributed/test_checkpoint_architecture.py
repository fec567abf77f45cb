"""Resume compares the saved config's architecture keys: 4 heads vs 8 of the same width have
the same tensor shapes but are another model (refused with one line unless
train.allow_arch_change); settings that may change on resume (capacity, coefficients) pass."""
import pytest

from dmoe.checkpoint.errors import CheckpointError
from dmoe.checkpoint.load import load_checkpoint
from dmoe.checkpoint.save import save_checkpoint
from dmoe.parallel.layout import ParallelLayout, build_process_groups
from dmoe.parallel.parallelize import parallelize
from dmoe.train.engines import TorchEngine
from tests._dist import run_ranks

from .equivalence import build_full_model, tiny_config


def _engine(run_dir, extra):
    cfg = tiny_config(1, 1, [f"--train.run_dir={run_dir}", *extra])
    groups = build_process_groups(ParallelLayout(1), 0)
    return cfg, groups, TorchEngine(parallelize(build_full_model(cfg), groups), cfg, groups)


def _save_then_load(rank, world, run_dir, extra):
    cfg, groups, engine = _engine(run_dir, [])
    path = save_checkpoint(engine, cfg, groups, step=1)
    _, groups2, engine2 = _engine(run_dir, extra)
    try:
        load_checkpoint(engine2, groups2, path)
    except CheckpointError as err:
        return str(err)
    return None


@pytest.mark.parametrize("extra,refused", [
    (["--model.n_heads=8"], "model.n_heads=4, this run has 8"),  # same shapes
    (["--moe.activation=swiglu"], "moe.activation='gelu', this run has 'swiglu'"),
    (["--model.n_heads=8", "--train.allow_arch_change=true"], None),
    (["--moe.capacity_factor=2.0", "--moe.aux_loss_coef=0.5", "--moe.top_k=1"], None),
])
def test_resume_refuses_another_architecture(tmp_path, extra, refused):
    err = run_ranks(_save_then_load, 1, args=(str(tmp_path), extra))[0]
    if refused is None:
        assert err is None
    else:
        assert err is not None and "\n" not in err
        assert f"saved with {refused}" in err and "allow_arch_change" in err
