"""Console logging for the commands that train: rich in a terminal, one plain line per record
elsewhere (Slurm's .out files, `| tee`, CI), and DeepSpeed's own output brought into line.

    setup_logging(rank)           # once, first thing on every rank
    quiet_deepspeed(rank)         # after deepspeed is imported (its logger is made then)
    fields(loss=2.5, step=10)     # "loss=2.5 step=10": how step lines print their numbers

Plain lines read `2026-11-30T02:45:12.345Z r0 INFO message`: an ISO UTC time, the rank, the
level, the message. A record never spans lines: a message's newlines become " | ", and each
line of a traceback carries the same prefix, so `grep` sees whole records.
DMOE_LOG_FORMAT=plain|rich overrides the choice made from whether stdout is a terminal.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import time
import warnings

PLAIN_TIME = "%Y-%m-%dT%H:%M:%S"
SIG_DIGITS = 4


def use_rich() -> bool:
    """Rich output (colours, wrapping, the live progress bar) only on a terminal."""
    choice = os.environ.get("DMOE_LOG_FORMAT", "").lower()
    if choice in ("plain", "rich"):
        return choice == "rich"
    return sys.stdout.isatty()


def format_value(value) -> str:
    """Integers as integers; floats to 4 significant digits without an exponent, or every
    integer digit from 10^4 up (10770.3 -> 10770, 0.000312345 -> 0.0003123, 2.0 -> 2);
    the rest as str()."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 10 ** SIG_DIGITS:  # every integer digit, no fraction
        return f"{value:.0f}"
    digits = SIG_DIGITS - 1 - math.floor(math.log10(abs(value)))
    text = f"{round(value, digits):.{max(digits, 0)}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def fields(**values) -> str:
    """key=value pairs separated by one space, numbers as format_value prints them."""
    return " ".join(f"{k}={format_value(v)}" for k, v in values.items())


class PlainFormatter(logging.Formatter):
    """One line per record: `<ISO UTC time> r<rank> <LEVEL> <message>`."""

    converter = time.gmtime

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        stamp = f"{time.strftime(PLAIN_TIME, time.gmtime(record.created))}.{int(record.msecs):03d}Z"
        prefix = f"{stamp} r{self.rank} {record.levelname}"
        message = record.getMessage().strip().replace("\r", "").replace("\n", " | ")
        lines = [f"{prefix} {message}"]
        if record.exc_info:
            lines += [f"{prefix} {line}" for line in self.formatException(record.exc_info).splitlines()]
        return "\n".join(lines)


class DropRootInfo(logging.Filter):
    """Drops INFO and below from the root logger itself: dmoe logs through named loggers;
    root INFO lines are other libraries' chatter (distutils logs through the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "root" or record.levelno >= logging.WARNING


class FirstLineOnly(logging.Filter):
    """A captured warning is `file:line: Category: message` and then the source line that
    warned (a library's internals): keep the first line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = record.getMessage().strip().split("\n", 1)[0], None
        return True


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO, the others WARNING; Python warnings go through the same handler."""
    if use_rich():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, markup=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter(f"[r{rank}] %(message)s" if rank else "%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(PlainFormatter(rank))
    handler.addFilter(DropRootInfo())
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # compilers: distutils' gcc probes when DeepSpeed checks its ops at import
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "compilers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # FutureWarnings and the like: once per place, one line, from rank 0 only
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    if not any(isinstance(f, FirstLineOnly) for f in warnings_log.filters):
        warnings_log.addFilter(FirstLineOnly())
    if "DS_ACCELERATOR" not in os.environ and not _cuda_available():
        # what DeepSpeed picks anyway, without its "Setting accelerator to CPU" line per process
        os.environ["DS_ACCELERATOR"] = "cpu"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def quiet_deepspeed(rank: int) -> None:
    """DeepSpeed's logger (its own stdout handler, `[date] [LEVEL] [file:line]` lines) routed
    through dmoe's handler at WARNING; one line before DeepSpeed JIT-compiles an op."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from deepspeed.utils import logger as ds_logger
    for handler in list(ds_logger.handlers):
        ds_logger.removeHandler(handler)
    ds_logger.setLevel(logging.WARNING)
    ds_logger.propagate = True
    _quiet_shm_op_print()
    if rank == 0:
        for name, where in jit_builds_pending():
            logging.getLogger(__name__).info(
                "DeepSpeed will JIT-compile its %s op at start-up (no prebuilt ops: DS_BUILD_OPS=0): "
                "about a minute of silence, once per machine; cached in %s", name, where)


def _quiet_shm_op_print() -> None:
    """deepspeed.comm prints "DeepSpeed ... built successfully" on every rank each time it
    loads its CPU comm op (cached or not): that print goes to a debug record instead."""
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # the package rebinds .torch
    original = ds_torch.build_shm_op
    if getattr(original, "dmoe_quiet", False):
        return

    def build_shm_op():
        with contextlib.redirect_stdout(io.StringIO()) as out:
            op = original()
        if out.getvalue().strip():
            logging.getLogger(__name__).debug("deepspeed: %s", out.getvalue().strip())
        return op

    build_shm_op.dmoe_quiet = True
    ds_torch.build_shm_op = build_shm_op


def jit_builds_pending() -> list[tuple[str, str]]:
    """The DeepSpeed ops dmoe's runs load that are neither prebuilt nor in torch's extension
    cache: on CPU the shared-memory comm op that deepspeed.comm loads when it initialises
    (dmoe's DeepSpeed config uses torch's AdamW, so no optimizer op is built)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    if get_accelerator().device_name() != "cpu":
        return []
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or installed_ops.get(builder.NAME, False):
        return []
    from torch.utils.cpp_extension import _get_build_directory

    where = _get_build_directory(builder.NAME, verbose=False)
    if os.path.exists(os.path.join(where, f"{builder.NAME}.so")):
        return []
    return [(builder.NAME, where)]
