"""What every command line in tools/ shares: `-c CONFIG -o Section.key=value`, the result as the last line of
stdout (one JSON object), and user errors as one paragraph on stderr with exit code 2 instead of a traceback.
"""
import argparse
import json
import os
import sys

from ppzoo.errors import PpzooError


def config_parser(description, config_required=True):
    """The parser every tool starts from. A tool with a task that needs no config (e.g. scoring structure files)
    passes config_required=False and checks -c itself for the tasks that do."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-c", "--config", required=config_required,
                        help="YAML config file (configs/<model>/<name>.yaml)")
    parser.add_argument(
        "-o", "--override", action="append", default=[], metavar="Section.key=value",
        help="override one config value; repeatable (e.g. -o Engine.max_steps=20)",
    )
    return parser


def is_main_process():
    return int(os.environ.get("PADDLE_TRAINER_ID", "0")) == 0


def print_result(result):
    """The tool's result as the last stdout line (only the first process prints it in a launched job)."""
    if is_main_process():
        print(json.dumps(result, default=str), flush=True)


def run(main):
    """Run a tool's main(); a PpzooError becomes a one-paragraph message and exit code 2."""
    try:
        code = main()
    except PpzooError as error:
        sys.stdout.flush()
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
