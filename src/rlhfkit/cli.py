"""``rlhfkit <stage> [flags]``: one subcommand per stage. Each stage's flags are its config
dataclass (``rlhfkit <stage> --help``); ``--config file.yaml`` supplies their defaults.

Expected errors (bad data, a missing file or model, a bad config, an unreachable server) print one
line, ``rlhfkit: error: ...``, and exit with status 2. ``--debug`` (or ``RLHFKIT_DEBUG=1``) shows
the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from rlhfkit import __version__
from rlhfkit.config import parse
from rlhfkit.errors import RlhfkitError, Waiting
from rlhfkit.platform.placement import end_processes
from rlhfkit.stages import STAGES


def usage() -> str:
    lines = ["usage: rlhfkit [--debug] <stage> [flags]   (rlhfkit <stage> --help lists a stage's flags)", "",
             "stages:"]
    for name, stage in STAGES.items():
        lines.append(f"  {name:<14} {stage.help}")
    return "\n".join(lines)


def group_usage(group: str) -> str:
    """``rlhfkit annotate --help``: the commands of a group of stages."""
    lines = [f"usage: rlhfkit {group} <command> [flags]   (rlhfkit {group} <command> --help lists its flags)", "",
             "commands:"]
    for name, stage in STAGES.items():
        if name.startswith(group + " "):
            lines.append(f"  {name.split(' ', 1)[1]:<10} {stage.help}")
    return "\n".join(lines)


class _Drop(logging.Filter):
    """Drops a dependency's log lines that hold one of ``phrases``."""

    def __init__(self, *phrases: str):
        super().__init__()
        self.phrases = phrases

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p in str(record.msg) for p in self.phrases)


def quiet_dependencies() -> None:
    """What the dependencies print that means nothing to a user of rlhfkit, filtered where rlhfkit triggers
    it (``--debug`` leaves everything on): their deprecation and future warnings (about their own APIs),
    accelerate's note that the tied embedding was saved once, DeepSpeed's accelerator probe on a machine
    without a GPU, and transformers' bars for loading and writing a few files. rlhfkit's own warnings,
    errors and progress bars are untouched."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|transformers|accelerate|peft|deepspeed)\b")
    logging.getLogger("accelerate.utils.other").addFilter(_Drop("Removed shared tensor"))
    # peft imports bitsandbytes where it is installed (the qlora extra), whose CPU backend then reports the
    # hub kernel it could not fetch: rlhfkit fetches nothing at run time and uses the kernels bitsandbytes ships
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_Drop("Failed to load CPU gemm_4bit_forward"))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's probe otherwise warns at import
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its load reports (a new reward head is "MISSING" from the checkpoint, as meant)
    warnings.showwarning = _show_warning


_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """rlhfkit's own warnings (a monitor's alarm) on a line of their own, without the source line that
    raised them; everything else as Python shows it."""
    if category.__module__.startswith("rlhfkit"):
        print(f"\nrlhfkit: {category.__name__}: {message}", file=file or sys.stderr, flush=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def fail(message: str) -> None:
    print(f"rlhfkit: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_stage(command: str, argv: list[str]):
    """Parse ``argv`` into the stage's config and call its ``run``."""
    stage = STAGES[command]
    cls = stage.config_class()
    cfg = parse(cls, argv, prog=f"rlhfkit {command}", description=cls.__doc__ or "")
    result = stage.entry()(cfg)
    end_processes()
    return result


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("RLHFKIT_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        print(f"rlhfkit {__version__}")
        return
    if len(argv) > 1 and argv[1] in ("-h", "--help") and any(n.startswith(argv[0] + " ") for n in STAGES):
        print(group_usage(argv[0]))
        return
    if not debug:
        quiet_dependencies()
    command = " ".join(argv[:2]) if " ".join(argv[:2]) in STAGES else argv[0]
    if command not in STAGES:
        groups = sorted({n.split()[0] for n in STAGES if n.startswith(argv[0] + " ")})
        hint = f"; '{argv[0]}' needs one of: {', '.join(n for n in STAGES if n.split()[0] in groups)}" if groups else ""
        print(usage(), file=sys.stderr)
        fail(f"unknown stage '{' '.join(argv[:2])}'{hint}")
    try:
        run_stage(command, argv[len(command.split()):])
    except Waiting as w:  # a stage that needs people: not an error
        print(f"rlhfkit: {w}", file=sys.stderr)
    except RlhfkitError as e:
        if debug:
            raise
        fail(str(e))


if __name__ == "__main__":
    main()
