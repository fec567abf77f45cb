"""The plain (non-terminal) log format: one record per line, numbers without exponents."""
import logging
import sys

import pytest

from dmoe.startup.logs import PlainFormatter, fields, format_value

LINE = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z r\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) .*$"


@pytest.mark.parametrize("value,text", [
    (10770.3, "10770"), (1.077e4, "10770"), (123456789.0, "123456789"), (5.5432, "5.543"),
    (0.000312345, "0.0003123"), (2.0, "2"), (0.1, "0.1"), (-3.14159, "-3.142"), (0.0, "0"),
    (12, "12"), (True, "True"), ("x", "x"), (float("nan"), "nan"), (9.99951, "10"),
])
def test_format_value(value, text):
    assert format_value(value) == text


def test_fields_are_key_value():
    assert fields(step=10, loss=2.53219, tokens_per_s=10770.3) == "step=10 loss=2.532 tokens_per_s=10770"


def _record(msg, exc_info=None):
    return logging.LogRecord("dmoe.x", logging.INFO, __file__, 1, msg, (), exc_info)


def test_plain_formatter_one_line_per_record():
    import re

    line = PlainFormatter(3).format(_record("two\nlines"))
    assert re.match(LINE, line) and line.endswith(" r3 INFO two | lines") and "\n" not in line
    try:
        raise ValueError("boom")
    except ValueError:
        text = PlainFormatter(0).format(_record("failed", sys.exc_info()))
    lines = text.splitlines()
    assert len(lines) > 2 and all(re.match(LINE, x) for x in lines)
    assert lines[-1].endswith("ValueError: boom")


def test_jit_build_is_announced_only_when_not_cached(tmp_path, monkeypatch):
    """dmoe's DeepSpeed runs on CPU load one JIT op (the shared-memory comm op): it is
    pending until torch's extension cache holds it."""
    from deepspeed.accelerator import get_accelerator

    from dmoe.startup.logs import jit_builds_pending

    if get_accelerator().device_name() != "cpu":
        assert jit_builds_pending() == []
        return
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    [(name, where)] = jit_builds_pending()
    assert name == "deepspeed_shm_comm" and where.startswith(str(tmp_path))
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    open(f"{where}/{name}.so", "wb").close()
    assert jit_builds_pending() == []


def test_setup_logging_plain_without_a_terminal():
    """Piped: one line per record, a warning on one line, root INFO chatter dropped, rank 1
    quiet below WARNING (a subprocess: setup_logging configures the process's logging)."""
    import re
    import subprocess

    code = """if True:
        import logging, warnings
        from dmoe.startup.logs import setup_logging
        setup_logging({rank})
        logging.getLogger("dmoe.x").info("hello %s", "there")
        logging.getLogger().info("gcc -c test.c")
        logging.getLogger("compilers.C.base").info("gcc test.o -laio")
        warnings.warn("old thing", FutureWarning)
        logging.getLogger("dmoe.x").warning("careful")
    """
    lines = {}
    for rank in (0, 1):
        proc = subprocess.run([sys.executable, "-c", code.format(rank=rank)], capture_output=True,
                              text=True, check=True, env={"PATH": "/usr/bin:/bin"})
        assert proc.stderr == ""
        lines[rank] = proc.stdout.splitlines()
        assert all(re.match(LINE, x) for x in lines[rank]), lines[rank]
    assert [x.split(" ", 2)[2] for x in lines[0]] == [
        "INFO hello there", "WARNING <string>:8: FutureWarning: old thing", "WARNING careful"]
    assert [x.split(" ", 1)[1] for x in lines[1]] == ["r1 WARNING careful"]
