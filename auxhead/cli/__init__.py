"""The `auxhead` command line: `auxhead train`, `auxhead acgan` and `auxhead layers`.

Each subcommand has the same shape: its options are parsed into a config dataclass, a run
function returns a result object, and a report writer turns that into files
(`auxhead.cli.report`) and the lines printed here. Exit codes: 0 done; 2 bad input (one line
naming the option, `UsageError`); 130 interrupted; 1 a bug (its traceback, and a request to
report it). `--debug` (before or after the subcommand) adds tracebacks to usage errors and
turns on auxhead's logging.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings

from auxhead._extras import missing_extra
from auxhead.cli._common import (
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    OutputFolder,
    UsageError,
    disk_full_message,
    is_disk_full,
    is_out_of_memory,
    one_line,
    warnings_shown_once,
)

__all__ = ["UsageError", "build_parser", "main"]

REPORT_BUGS = (
    "auxhead: this is a bug in auxhead, not in your input; please report it with the command "
    "line and the traceback above"
)


class Interrupted(Exception):
    """Ctrl-C, with the line that says what the run kept."""


def _debug_option(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the traceback of usage errors too, and auxhead's log",
    )


def _version() -> str:
    from auxhead import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    # The commands import fastai, whose import raises deprecation notices about its own code and
    # its dependencies' (torch.jit.script, a pandas option): nothing a user of the command can act
    # on, so they are not shown, even for --help (-W or PYTHONWARNINGS still choose). Warnings
    # raised during a run are shown, each once (`warnings_shown_once`).
    with warnings.catch_warnings():
        if not sys.warnoptions:
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
        from auxhead.cli import acgan, layers, train

    parser = argparse.ArgumentParser(
        prog="auxhead",
        description="Auxiliary classifiers for PyTorch and fastai. `auxhead COMMAND --help` "
        "is each command's manual.",
    )
    _debug_option(parser, False)
    parser.add_argument("--version", action="version", version=f"auxhead {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, run in ((train, _run_train), (acgan, _run_acgan), (layers, _run_layers)):
        sub = module.add_parser(subparsers)
        _debug_option(sub, argparse.SUPPRESS)  # after the subcommand too, without resetting it
        sub.set_defaults(run=run)
    return parser


def _kept(kept: list, what: str) -> str:
    """The end of the Ctrl-C line: the checkpoints that exist, or that there are none."""
    if not kept:
        return "no epoch completed, so nothing was saved"
    return f"{what} is in {' and '.join(map(str, kept))}"


def _run_train(args: argparse.Namespace) -> int:
    from auxhead.cli.report import terminal_summary, write_report
    from auxhead.cli.train import OWNED_FILES, check_config, config_from_args, run_train

    config = config_from_args(args)
    if config.task == "segment":
        return _run_segment(config)
    check_config(config)  # before --out is touched
    print(f"auxhead train: {config.arch} on {config.data}, heads: "
          f"{config.head} -> {config.out}", flush=True)  # fmt: skip
    with OutputFolder(config.out, OWNED_FILES) as out:
        try:
            result = run_train(config, say=lambda line: print(line, flush=True))
        except KeyboardInterrupt:
            kept = out.existing(["checkpoint.pth"])
            raise Interrupted(_kept(kept, "the last completed epoch")) from None
        write_report(result, out.path)
    print()
    print(terminal_summary(result))
    print(f"\nreport: {out.path / 'report.md'}  (json, plots, exported model and checkpoint "
          f"beside it)")  # fmt: skip
    return EXIT_OK


def _run_segment(config) -> int:
    from auxhead.cli.report import segment_summary, write_segment_report
    from auxhead.cli.segment import OWNED_FILES, check_segment_config, run_segment

    check_segment_config(config)  # before --out is touched
    heads = f"--at {' '.join(config.at)}" if config.at else config.heads
    print(f"auxhead train --task segment: {config.arch} on {config.data}, heads: {heads} -> "
          f"{config.out}", flush=True)  # fmt: skip
    with OutputFolder(config.out, OWNED_FILES) as out:
        try:
            result = run_segment(config, say=lambda line: print(line, flush=True))
        except KeyboardInterrupt:
            kept = out.existing(["checkpoint.pth"])
            raise Interrupted(_kept(kept, "the last completed epoch")) from None
        write_segment_report(result, out.path)
    print()
    print(segment_summary(result))
    print(f"\nreport: {out.path / 'report.md'}  (json, predictions.png, exported model and "
          "checkpoint beside it)")  # fmt: skip
    return EXIT_OK


def _run_acgan(args: argparse.Namespace) -> int:
    from auxhead.cli.acgan import OWNED_FILES, check_config, config_from_args, run_acgan
    from auxhead.cli.report import write_acgan_report

    config = config_from_args(args)
    check_config(config)  # before --out is touched
    with OutputFolder(config.out, OWNED_FILES) as out:
        try:
            result = run_acgan(config, say=lambda line: print(line, flush=True))
        except KeyboardInterrupt:
            folders = ["", *config.conditioning[1:]]
            kept = out.existing([f"{f}/checkpoint.pth".lstrip("/") for f in folders])
            what = "the last completed epoch" + (" (both networks)" if kept else "")
            raise Interrupted(_kept(kept, what)) from None
        files = write_acgan_report(result, out.path)
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(f"wrote {files['report_md']} ({result.total_seconds:.0f} s)")
    return EXIT_OK


def _run_layers(args: argparse.Namespace) -> int:
    from auxhead.cli.layers import config_from_args, run_layers

    result = run_layers(config_from_args(args), say=lambda line: print(line, flush=True))
    print(result.table())
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the command line on `argv` (default `sys.argv[1:]`); returns the exit code."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while the libraries import, before any run has begun
        print("\nauxhead: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    # Warnings are shown, each once: a run collects and reports the UserWarnings and
    # RuntimeWarnings it raises (`collect_warnings`); the rest (deprecations) go to stderr.
    with warnings_shown_once():
        try:
            return _parse_and_run(list(sys.argv[1:] if argv is None else argv))
        except ModuleNotFoundError as error:  # the commands import fastai as they are built
            missing = missing_extra(error, "the auxhead command")
            if missing is None:
                raise
            print(f"auxhead: error: {missing}", file=sys.stderr)
            return EXIT_USAGE


def _parse_and_run(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or an option argparse refused (2)
        return EXIT_USAGE if exit_.code not in (0, None) else EXIT_OK
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except Interrupted as interrupted:
        print(f"\nauxhead: interrupted; {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("\nauxhead: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `auxhead layers | head`: the reader has gone
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (nothing more to flush at exit)
        return EXIT_OK
    except Exception as error:
        from auxhead.data import DataError

        missing = missing_extra(error, "the auxhead command")
        if missing is not None:  # a library imported on first use (matplotlib, say)
            print(f"auxhead: error: {missing}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(error, (UsageError, DataError)):
            if args.debug:
                traceback.print_exc()
            print(f"auxhead: error: {one_line(error)}", file=sys.stderr)
            return EXIT_USAGE
        if is_disk_full(error):  # a file written outside `atomic_path` (fastai's, a library's)
            if args.debug:
                traceback.print_exc()
            where = getattr(error, "filename", None) or getattr(args, "out", None) or "--out"
            print(f"auxhead: error: {disk_full_message(where)}", file=sys.stderr)
            return EXIT_USAGE
        if is_out_of_memory(error):
            if args.debug:
                traceback.print_exc()
            print(f"auxhead: error: out of memory ({one_line(error)[:120]}): lower the batch "
                  "size (--bs) or the image size (--size)", file=sys.stderr)  # fmt: skip
            return EXIT_USAGE
        traceback.print_exc()
        print(REPORT_BUGS, file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
