"""The CLI shows the options a library message names (```max_batch```) as its flags."""

from __future__ import annotations

import logging

from click.testing import CliRunner

from rsd_deploy.cli import _as_flags, main
from rsd_deploy.errors import RSDError, option


def test_options_become_the_commands_flags():
    fuse, bench, train = (main.commands[c] for c in ("fuse-export", "bench", "train"))
    message = f"{option('opt_batch')} must be between 1 and {option('max_batch')} (8); got 16"
    assert _as_flags(message, fuse, main) == "--opt-batch must be between 1 and --max-batch (8); got 16"
    # A flag of another command (bench's hint to rebuild an engine), a backend flag, a plain word.
    assert _as_flags(f"rebuild with {option('max_batch')} 64", bench, main) == "rebuild with --max-batch 64"
    assert _as_flags(f"build one with fuse_export ({option('trt')})", bench, main) == \
        "build one with rsd-deploy fuse-export (--trt)"
    assert _as_flags(f"{option('resume')} needs {option('out')}", train, main) == "--resume needs --out"
    assert _as_flags(f"no {option('source_sha')} here", None, main) == "no source_sha here"
    assert _as_flags("the `rsd-deploy` text is left alone", train, main) == "the `rsd-deploy` text is left alone"
    # A path or file name that contains the function's name is not rewritten.
    path_msg = "weights file runs/fuse_export/model.safetensors not found; see x-fuse_export.log"
    assert _as_flags(path_msg, train, main) == path_msg
    assert _as_flags("re-export it with fuse_export from runs/a", bench, main) == \
        "re-export it with rsd-deploy fuse-export from runs/a"


def test_an_error_is_one_line_with_flags(monkeypatch):
    @main.command("_raise", hidden=True)
    def _raise() -> None:
        raise RSDError(f"{option('batch_size')} must be at least 1 (got 0)")

    try:
        result = CliRunner().invoke(main, ["_raise"])
    finally:
        main.commands.pop("_raise")
    assert result.exit_code == 1
    assert result.output == "error: --batch-size must be at least 1 (got 0)\n"


def test_library_progress_is_logging_not_print(capsys):
    """The library prints nothing: its progress is logged at INFO."""
    from rsd_deploy.bench.runner import Budget, measure

    logger = logging.getLogger("rsd_deploy")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logging.disable(logging.CRITICAL)  # whatever an earlier CLI test configured: only a print would show
    try:
        measure({"a": lambda: 1e-3}, Budget(warmup_s=0, iters=1), label="batch 1")
    finally:
        logging.disable(logging.NOTSET)
    assert capsys.readouterr() == ("", "")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        measure({"a": lambda: 1e-3}, Budget(warmup_s=0, iters=1), label="batch 1")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen[0].startswith("batch 1: warm-up a:") and seen[-1].startswith("batch 1: round 1:")
