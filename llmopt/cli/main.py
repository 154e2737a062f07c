"""``llmopt``: the entry point. Each verb lives in its own module and registers itself here."""

from __future__ import annotations

import os
import sys

import typer

from llmopt import __version__
from llmopt.cli import _output
from llmopt.errors import EXIT_RUNTIME, EXIT_USAGE, LlmoptError, UsageError, first_line

app = typer.Typer(
    name="llmopt",
    help="Compile Hugging Face causal LMs into static-shape artifacts (ONNX, OpenVINO, Neuron, TensorRT) and run them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmopt {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    log_format: str = typer.Option("auto", "--log-format", help="Progress on stderr: auto, rich, plain or json (one event per line)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    if log_format not in _output.LOG_FORMATS:
        raise UsageError(f"--log-format '{log_format}' is not one of: {', '.join(_output.LOG_FORMATS)}")
    _output.configure_logging(log_format, quiet=quiet, verbose=verbose)


def _register_commands() -> None:
    from llmopt.cli import export, run  # noqa: F401  (each module adds its command to ``app``)

    for optional in ("quantize", "bench", "inspect", "doctor", "hub", "serve"):
        try:
            __import__(f"llmopt.cli.{optional}")
        except ModuleNotFoundError as exc:
            if exc.name != f"llmopt.cli.{optional}":
                raise


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 runtime failure, 2 usage or recipe error)."""
    _register_commands()
    debug = os.environ.get("LLMOPT_DEBUG", "") not in ("", "0")
    try:
        code = app(args=argv, standalone_mode=False, prog_name="llmopt")
    except LlmoptError as exc:
        if debug:
            raise
        _output.print_error(exc.message, exc.hint)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:  # a bad flag value, an unknown option, a missing argument
        if debug:
            raise
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        context = getattr(exc, "ctx", None)
        command = context.command_path if context is not None else "llmopt"
        _output.print_error(message, f"see '{command} --help'")
        return exc.exit_code if getattr(exc, "exit_code", None) else EXIT_USAGE
    except typer.Abort:
        _output.print_error("aborted")
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        _output.print_error("interrupted")
        return 130
    except Exception as exc:  # a backend call no step wraps: still one line, the traceback under LLMOPT_DEBUG
        if debug:
            raise
        _output.print_error(f"unexpected {type(exc).__name__}: {first_line(exc)}",
                            "LLMOPT_DEBUG=1 shows the traceback; please report it")
        return EXIT_RUNTIME
    return code if isinstance(code, int) else 0  # typer.Exit(code) comes back as the return value


def entry() -> None:
    sys.exit(main())
