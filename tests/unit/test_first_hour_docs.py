"""The MoELayer example of README.md, run as written: in one process, and under
2 gloo ranks expert-parallel, where it must give the one-process loss and gradients (fp64,
1e-12; the experts compute in fp64 too, so a mismatch is a dispatch bug, not rounding)."""
import re
from pathlib import Path

import torch

import dmoe.moe.experts as experts_module
from tests._dist import run_ranks

DOC = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Using MoELayer in your own model"


def example_blocks() -> list[str]:
    """The section's python blocks: the model, the one-process run, the expert-parallel run."""
    text = DOC.read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 3, "the MoELayer section should hold exactly 3 python blocks"
    return blocks


def _run(blocks: list[str]) -> dict:
    """exec the blocks in fp64 (experts too); the namespace's loss and grads."""
    dtype, saved = torch.get_default_dtype(), dict(experts_module.EXPERT_DTYPES)
    torch.set_default_dtype(torch.float64)
    experts_module.EXPERT_DTYPES["float32"] = torch.float64
    try:
        ns: dict = {}
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), ns)  # noqa: S102 - the doc example, run as written
    finally:
        torch.set_default_dtype(dtype)
        experts_module.EXPERT_DTYPES.clear()
        experts_module.EXPERT_DTYPES.update(saved)
    model = ns["model"]
    assert model.moe.experts.w1.dtype == torch.float64
    return {"loss": ns["loss"].detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}


def _ep_rank(rank, world, blocks):
    import torch.distributed as dist

    out = _run([blocks[0], blocks[2]])
    assert dist.get_world_size() == world
    return out


def test_example_runs_and_expert_parallel_matches_one_process():
    blocks = example_blocks()
    ref = _run(blocks[:2])
    assert torch.isfinite(ref["loss"]) and all(g is not None for g in ref["grads"].values())
    world = 2
    for rank, out in enumerate(run_ranks(_ep_rank, world, args=(blocks,))):
        torch.testing.assert_close(out["loss"], ref["loss"], rtol=0, atol=1e-12)
        for name, grad in out["grads"].items():
            want = ref["grads"][name]
            if name.startswith("moe.experts."):  # this rank's 4 of the 8 experts
                want = world * want[rank * 4:(rank + 1) * 4]
            torch.testing.assert_close(grad, want, rtol=0, atol=1e-12, msg=f"rank {rank} {name}")
