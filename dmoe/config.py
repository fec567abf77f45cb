"""Run configuration: dataclasses are the schema, YAML holds values, CLI overrides win.

    cfg = load_config("configs/default.yaml", ["--moe.capacity_factor=1.5"])
    cfg = load_config("mixtral-tiny")          # a packaged config (dmoe/configs/), by name

Each field carries its one-line description (doc() / choice() metadata): `dmoe train --help`
prints them (dmoe.tools.config_show). Every error is one line naming the dotted field and
the offending value(s): unknown keys name the closest valid one and list the valid ones,
wrong types name the expected type, impossible combinations name both fields.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad config value; str(err) is the one line shown to the user."""


def doc(default, help: str):
    """A config field with its one-line description (`dmoe train --help` prints it)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def choice(default, options, help: str = ""):
    """A field that takes one of `options`."""
    return field(default=default, metadata={"choices": tuple(options), "help": help})


@dataclass
class ModelConfig:
    """The transformer's shape and architecture options."""

    vocab_size: int = doc(256, "vocabulary size; 0: the tokenizer's")
    d_model: int = doc(128, "model (residual stream) width")
    n_layers: int = doc(4, "transformer blocks")
    n_heads: int = doc(4, "attention query heads")
    seq_len: int = doc(128, "tokens per training sequence (the context length)")
    ffn_dim: int = doc(512, "dense MLP hidden size")
    positions: str = choice("rotary", ["rotary", "learned"], "position encoding")
    dropout: float = doc(0.0, "dropout after attention and FFN (and in attention)")
    tie_embeddings: bool = doc(True, "the LM head shares the token embedding's weights")
    norm: str = choice("layernorm", ["layernorm", "rmsnorm"], "normalisation layers")
    norm_eps: float = doc(1e-5, "epsilon of every norm")
    n_kv_heads: int = doc(0, "grouped-query attention: key/value heads; 0: n_heads (MHA)")
    head_dim: int = doc(0, "per attention head; 0: d_model / n_heads (Qwen3 may set it apart)")
    bias: bool = doc(False, "biases on the attention output and dense MLP linears (and qkv)")
    qkv_bias: bool = doc(False, "a bias on the qkv projection alone (Qwen2)")
    qk_norm: bool = doc(False, "RMSNorm on each query and key head (Qwen3)")
    rope_theta: float = doc(10000.0, "rotary base frequency")
    mlp_activation: str = choice("gelu", ["gelu", "swiglu"], "the dense MLP's activation")


@dataclass
class MoEConfig:
    """The MoE layers: experts, routing, capacity and balancing losses."""

    num_experts: int = doc(8, "routed experts per MoE layer")
    top_k: int = doc(2, "experts each token is routed to")
    every: int = doc(2, "an MoE FFN in every `every`-th block (block i with (i+1) % every == 0)")
    expert_ffn_dim: int = doc(256, "hidden size of each expert's MLP")
    activation: str = choice("gelu", ["gelu", "swiglu"], "the experts' activation")
    capacity_factor: typing.Optional[float] = doc(
        1.25, "expert capacity in training, x the even share of tokens; null or 0: dropless")
    eval_capacity_factor: typing.Optional[float] = doc(
        2.0, "expert capacity in evaluation; null or 0: dropless")
    min_capacity: int = doc(4, "the least rows an expert keeps per batch")
    drop_policy: str = choice("position", ["position", "probability"],
                              "which tokens an over-full expert drops: the latest, or the least likely")
    router_jitter: float = doc(0.0, "multiplicative noise on router inputs in training (Switch)")
    normalize_topk: bool = doc(True, "renormalise the top_k gates to sum to 1")
    aux_loss_coef: float = doc(0.01, "load-balancing (Switch) loss weight")
    z_loss_coef: float = doc(0.001, "router z-loss weight (ST-MoE)")
    expert_dtype: str = choice("auto", ["auto", "float32", "bfloat16"],
                               "the expert matmuls' dtype; auto: the run's compute dtype "
                               "(bfloat16 under train.precision=bf16, else float32)")
    experts_impl: str = choice("auto", ["auto", "fused", "loop", "torch_grouped_mm"],
                               "expert matmuls: auto (per device, dtype and rows; dmoe.moe.experts)")
    score_func: str = choice("softmax", ["softmax", "sigmoid"], "router scores (sigmoid: DeepSeek-V3)")
    route_scale: float = doc(1.0, "multiplies the gates (after normalize_topk)")
    seq_aux_loss_coef: float = doc(0.0, "DeepSeek-V3 sequence-wise balance loss weight")
    num_groups: int = doc(1, "group-limited routing: experts in contiguous groups; 1: off")
    topk_groups: int = doc(1, "groups a token may route into (num_groups > 1)")
    num_shared_experts: int = doc(0, "always-on experts beside the routed ones (dense params)")
    shared_expert_ffn_dim: int = doc(0, "per shared expert; 0: expert_ffn_dim")
    shared_expert_gate: bool = doc(False, "scale the shared output by sigmoid(w . x) (Qwen2-MoE)")
    first_dense_layers: int = doc(0, "the first N blocks use the dense MLP (DeepSeek)")
    bias_update_rate: float = doc(0.0, "auxiliary-loss-free balancing (DeepSeek-V3); 0: off")


@dataclass
class ParallelConfig:
    """The rank layout (tp x ep x dp = world size) and communication options."""

    tp: int = doc(1, "tensor-parallel degree")
    ep: int = doc(1, "expert-parallel degree (divides moe.num_experts)")
    backend: str = choice("auto", ["auto", "gloo", "nccl"], "process-group backend (auto: by device)")
    a2a_dedup: bool = doc(
        False, "EP all-to-all sends each token once per EP rank (with its experts' gates), not "
        "once per chosen expert: fewer bytes whenever a token picks two experts on one rank")
    a2a_chunks: int = doc(
        1, "EP rows cut into this many chunks whose all-to-alls overlap the experts' compute "
        "(async, forward and backward); 1: one blocking exchange each way (bench/README.md)")
    timeout_s: float = doc(
        300.0, "dmoe's watchdog: a rank with no progress (no step, eval or save finished) for this "
        "many seconds writes one line naming the step and last collective and exits 4; 0: off")


@dataclass
class DataConfig:
    """The training text, its tokenizer and where the token files go."""

    paths: list = doc([], "text files/dirs; empty: the built-in corpus")
    builtin: str = choice(
        "stdlib", ["stdlib", "multidomain"],
        "the built-in corpus when paths is empty: Python's source, or code, reference prose, "
        "legal text and changelogs (dmoe.data.multidomain)")
    domains: list = doc([], "multidomain: keep only these; empty: all")
    data_dir: str = doc("data", "where the token files go (relative: to the working directory)")
    tokenizer: str = choice("byte", ["byte", "bpe"], "byte-level, or a BPE trained on the corpus")
    bpe_vocab_size: int = doc(2048, "the BPE tokenizer's vocabulary size")
    val_fraction: float = doc(0.05, "share of the corpus held out for validation")
    max_corpus_mb: float = doc(16.0, "the most text read, in MB")
    sampler: str = choice("random", ["random", "epoch"],
                          "training windows: random, or each window once per epoch")


@dataclass
class TrainConfig:
    """The training loop: engine, optimisation, evaluation, checkpoints and metrics."""

    engine: str = choice("auto", ["auto", "torch", "deepspeed"],
                         "auto: deepspeed under the deepspeed launcher, else torch")
    steps: int = doc(400, "optimizer steps")
    micro_batch_size: int = doc(16, "sequences per rank per micro step")
    grad_accum: int = doc(1, "micro steps per optimizer step")
    lr: float = doc(3e-3, "peak learning rate (AdamW)")
    min_lr: float = doc(3e-4, "learning rate at the end of the schedule")
    warmup_steps: int = doc(30, "linear warm-up steps")
    weight_decay: float = doc(0.1, "AdamW weight decay")
    grad_clip: float = doc(1.0, "clip the global gradient norm to this")
    zero_stage: int = doc(1, "DeepSpeed ZeRO stage (0, 1 or 2)")
    seed: int = doc(1234, "random seed (model init, data order)")
    log_every: int = doc(10, "steps between train metric lines")
    eval_every: int = doc(100, "steps between evaluations")
    eval_batches: int = doc(8, "validation batches per evaluation")
    run_dir: str = doc("runs/default", "checkpoints, metrics and the resolved config "
                       "(relative: to the working directory)")
    precision: str = choice("auto", ["auto", "fp32", "bf16"],
                            "bf16: autocast, fp32 master weights; auto: bf16 on a GPU that has it, "
                            "else fp32 (TF32 matmuls on CUDA); chosen and logged at start")
    threads: int = doc(0, "torch threads per rank; 0: cores / local ranks")
    save_every: int = doc(0, "checkpoint every N steps (and at the last step); 0: off")
    resume: str = doc("", "\"\": fresh start; \"auto\": latest checkpoint in run_dir; or a path")
    keep_last: int = doc(3, "complete checkpoints kept; 0: keep all")
    overwrite: bool = doc(
        False, "a fresh start (resume \"\") in a run_dir that holds checkpoints is refused unless "
        "true: then the old checkpoints/ is moved aside (checkpoints.replaced-<time>/)")
    nonfinite: str = choice(
        "stop", ["stop", "skip"],
        "a non-finite loss or gradient norm (all ranks agree): stop (one line, exit 3, nothing of "
        "that state saved) or skip the optimizer step, at most max_skipped_steps times")
    max_skipped_steps: int = doc(10, "train.nonfinite=skip: the most steps skipped")
    save_on_signal: bool = doc(
        False, "SIGTERM / SIGINT (ranks agree at the step boundary): true: finish the step, save "
        "a checkpoint, exit 0; false: stop there with one line, exit 128 + the signal number")
    allow_arch_change: bool = doc(
        False, "resuming a checkpoint whose saved config differs in an architecture key "
        "(model.n_heads, moe.num_experts, ...: dmoe.checkpoint.load.ARCHITECTURE_KEYS) is "
        "refused unless true")
    activation_checkpointing: str = choice(
        "none", ["none", "block", "experts"],
        "recompute in backward instead of keeping activations: each transformer block, or only "
        "the expert MLPs (their dispatch and all-to-all run once)")
    peak_tflops: float = doc(
        0.0, "MFU's denominator, one rank's peak TFLOP/s (e.g. 989 for an H100's dense bf16); "
        "0: a short fp32 matmul measured at start (logged once)")
    dead_expert_steps: int = doc(
        100, "warn (once per expert until it revives) when an expert receives no tokens for this "
        "many steps in a row; the metrics count such experts per layer; 0: off")
    wandb_project: str = doc(
        "", "Weights & Biases project to log to beside TensorBoard (rank 0; needs `pip install "
        "wandb`); \"\": off")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# decimal literals only (no nan/inf, no underscores): "1e-4", "-2.5E+3", ".5"
FLOAT_LITERAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(path: str, value, hint):
    """Check `value` against the type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and FLOAT_LITERAL.match(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string: a number is meant
    if hint is list and isinstance(value, str):
        return [value]
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{path} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _did_you_mean(prefix: str, key: str, names) -> str:
    """' (did you mean moe.capacity_factor?)': the closest key of this section, else the same
    key in another section; '' when nothing is close."""
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {prefix}{close[0]}?)"
    if prefix:
        for section in dataclasses.fields(Config):
            if key in {f.name for f in dataclasses.fields(section.default_factory)}:
                return f" (did you mean {section.name}.{key}?)"
    return ""


def _apply(obj, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}{_did_you_mean(prefix, key, fields)}; "
                              f"valid keys: {', '.join(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a mapping, got {value!r}")
            _apply(current, value, path + ".")
            continue
        value = _coerce(path, value, hints[key])
        options = fields[key].metadata.get("choices")
        if options and value not in options:
            raise ConfigError(f"{path} ({value!r}) must be one of {list(options)}")
        setattr(obj, key, value)


def parse_overrides(args: list[str]) -> dict:
    """['--moe.top_k=1', '--train.steps', '5'] -> {'moe': {'top_k': 1}, 'train': {'steps': 5}}."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value")
            i, raw = i + 1, args[i + 1]
        if "." not in key:
            raise ConfigError(f"override --{key} must name a section, e.g. --moe.top_k=2")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
        i += 1
    return tree


def validate(cfg: Config) -> None:
    m, e, t = cfg.model, cfg.moe, cfg.train
    positive = {
        "model.d_model": m.d_model, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
        "model.seq_len": m.seq_len, "moe.num_experts": e.num_experts, "moe.every": e.every,
        "moe.expert_ffn_dim": e.expert_ffn_dim, "train.steps": t.steps,
        "train.micro_batch_size": t.micro_batch_size, "train.grad_accum": t.grad_accum,
        "parallel.tp": cfg.parallel.tp, "parallel.ep": cfg.parallel.ep,
        "parallel.a2a_chunks": cfg.parallel.a2a_chunks,
    }
    for name in ("train.save_every", "train.keep_last"):
        value = getattr(t, name.split(".")[1])
        if value < 0:
            raise ConfigError(f"{name} ({value}) must be >= 0")
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name} ({value}) must be >= 1")
    if m.head_dim < 0:
        raise ConfigError(f"model.head_dim ({m.head_dim}) must be >= 0 (0: d_model / n_heads)")
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    _validate_attention(cfg)
    for name in ("moe.num_shared_experts", "moe.shared_expert_ffn_dim", "moe.first_dense_layers"):
        value = getattr(e, name.split(".")[1])
        if value < 0:
            raise ConfigError(f"{name} ({value}) must be >= 0")
    if not 0 < m.norm_eps < 1:
        raise ConfigError(f"model.norm_eps ({m.norm_eps}) must be in (0, 1)")
    head_dim = m.head_dim or m.d_model // m.n_heads
    if head_dim % 2 and m.positions == "rotary":
        raise ConfigError(f"the head dim (model.head_dim, or model.d_model / model.n_heads: "
                          f"{head_dim}) must be even for rotary positions")
    if not 1 <= e.top_k <= e.num_experts:
        raise ConfigError(f"moe.top_k ({e.top_k}) must be in [1, moe.num_experts ({e.num_experts})]")
    _validate_routing(e)
    if cfg.parallel.a2a_chunks > 1 and cfg.parallel.a2a_dedup:
        raise ConfigError(f"parallel.a2a_chunks ({cfg.parallel.a2a_chunks}) > 1 needs "
                          f"parallel.a2a_dedup false (the dedup dispatcher does not chunk)")
    if e.num_experts % cfg.parallel.ep:
        raise ConfigError(
            f"moe.num_experts ({e.num_experts}) must be divisible by parallel.ep ({cfg.parallel.ep})"
        )
    if t.zero_stage not in (0, 1, 2):
        raise ConfigError(
            f"train.zero_stage ({t.zero_stage}) must be 0, 1 or 2: DeepSpeed does not support "
            "ZeRO stage 3 with MoE expert parameters"
        )
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction ({cfg.data.val_fraction}) must be in (0, 1)")
    _validate_ranges(cfg)


# (low, high, low inclusive) of numeric fields the checks above do not bound; None: open.
# Every float field must also be finite (NaN and infinities are refused).
RANGES = {
    "model.vocab_size": (0, None, True), "model.ffn_dim": (1, None, True),
    "model.dropout": (0, 1, True), "model.rope_theta": (0, None, False),
    "moe.capacity_factor": (0, None, True), "moe.eval_capacity_factor": (0, None, True),
    "moe.min_capacity": (0, None, True), "moe.router_jitter": (0, 1, True),
    "moe.aux_loss_coef": (0, None, True), "moe.z_loss_coef": (0, None, True),
    "data.bpe_vocab_size": (1, None, True), "data.max_corpus_mb": (0, None, False),
    "train.lr": (0, None, False), "train.min_lr": (0, None, True),
    "train.warmup_steps": (0, None, True), "train.weight_decay": (0, None, True),
    "train.grad_clip": (0, None, True), "train.seed": (0, 2**63 - 1, True),
    "train.log_every": (1, None, True), "train.eval_every": (1, None, True),
    "train.eval_batches": (1, None, True), "train.threads": (0, None, True),
    "train.max_skipped_steps": (0, None, True), "parallel.timeout_s": (0, None, True),
    "train.peak_tflops": (0, None, True), "train.dead_expert_steps": (0, None, True),
}


def _validate_ranges(cfg: Config) -> None:
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value, name = getattr(getattr(cfg, section.name), f.name), f"{section.name}.{f.name}"
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name} ({value}) must be a finite number")
            if name not in RANGES or value is None or isinstance(value, (bool, str)):
                continue
            low, high, closed = RANGES[name]
            if (value < low if closed else value <= low) or (high is not None and value > high):
                where = f"{'>=' if closed else '>'} {low}" + (f" and <= {high}" if high is not None else "")
                raise ConfigError(f"{name} ({value}) must be {where}")


def validate_paths(cfg: Config) -> None:
    """Directories the run writes must be (or become) directories; data.paths must exist.
    Checked where a run starts (dmoe.startup.command), not by load_config: a checkpoint's
    saved config names the paths of the machine that trained it."""
    for name, value in (("train.run_dir", cfg.train.run_dir), ("data.data_dir", cfg.data.data_dir)):
        path = Path(value)
        blocker = next((p for p in (path, *path.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise ConfigError(f"{name} ({value}): {blocker} is a file, not a directory")
        if blocker is not None and not os.access(blocker, os.W_OK | os.X_OK):
            raise ConfigError(f"{name} ({value}): cannot create or write it ({blocker} is not writable)")
    for item in cfg.data.paths:
        if not Path(item).exists():
            raise ConfigError(f"data.paths ({item}): no such file or directory")


def _validate_attention(cfg: Config) -> None:
    m, tp = cfg.model, cfg.parallel.tp
    kv = m.n_kv_heads or m.n_heads
    if m.n_kv_heads < 0 or m.n_heads % kv:
        raise ConfigError(f"model.n_kv_heads ({m.n_kv_heads}) must divide model.n_heads ({m.n_heads})")
    if kv != m.n_heads and kv % tp:
        raise ConfigError(f"model.n_kv_heads ({kv}) must be divisible by parallel.tp ({tp}): "
                          "TP splits grouped-query attention by whole key/value heads")


def _validate_routing(e: MoEConfig) -> None:
    """The MoE router options: group-limited routing must leave top_k experts reachable."""
    if e.num_groups < 1:
        raise ConfigError(f"moe.num_groups ({e.num_groups}) must be >= 1")
    if e.num_experts % e.num_groups:
        raise ConfigError(
            f"moe.num_experts ({e.num_experts}) must be divisible by moe.num_groups ({e.num_groups})"
        )
    if not 1 <= e.topk_groups <= e.num_groups:
        raise ConfigError(
            f"moe.topk_groups ({e.topk_groups}) must be in [1, moe.num_groups ({e.num_groups})]"
        )
    reachable = e.topk_groups * (e.num_experts // e.num_groups)
    if e.top_k > reachable:
        raise ConfigError(
            f"moe.top_k ({e.top_k}) must be <= moe.topk_groups ({e.topk_groups}) * "
            f"moe.num_experts ({e.num_experts}) / moe.num_groups ({e.num_groups}) = {reachable}"
        )
    if e.route_scale <= 0:
        raise ConfigError(f"moe.route_scale ({e.route_scale}) must be > 0")
    if e.seq_aux_loss_coef < 0:
        raise ConfigError(f"moe.seq_aux_loss_coef ({e.seq_aux_loss_coef}) must be >= 0")
    if e.bias_update_rate < 0:
        raise ConfigError(f"moe.bias_update_rate ({e.bias_update_rate}) must be >= 0")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{self.name}: key {key!r} appears twice "
                                  f"(line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


PRESETS_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "default"  # dmoe/configs/default.yaml, whatever the working directory


def presets() -> list[str]:
    """The configs that ship inside the package, by name (dmoe/configs/<name>.yaml)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def find_config(path: str | Path) -> Path:
    """`path` when it names a file, else the packaged preset of that name (`default`,
    `mixtral-tiny`, `configs/default.yaml` from any directory)."""
    given = Path(path)
    bare = len(given.parts) == 1 or given.parts[:-1] in (("configs",), ("configs", "experiments"))
    if given.exists() or not bare or given.suffix not in ("", ".yaml"):
        return given  # a path: read as it is (a missing one fails naming it)
    for candidate in (PRESETS_DIR / f"{given.name}.yaml", PRESETS_DIR / given.name,
                      PRESETS_DIR / given.relative_to("configs") if given.parts[:1] == ("configs",) else None):
        if candidate is not None and candidate.is_file():
            return candidate
    raise ConfigError(f"config {str(path)!r} not found: no such file, and no packaged config of that "
                      f"name ({', '.join(presets())})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Config defaults <- the YAML file (a path, or a packaged preset's name) <- overrides."""
    cfg = Config()
    if path is not None:
        path = find_config(path)
        try:
            with open(path) as f:  # the loader names the file in its errors
                values = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {path}: {err}".splitlines()[0]) from None
        if not isinstance(values, dict):
            raise ConfigError(f"config {path} must be a mapping of sections, got {type(values).__name__}")
        _apply(cfg, values)
    _apply(cfg, parse_overrides(overrides or []))
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
