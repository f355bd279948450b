"""Open the viewer page of a diagnosis (``diagnose --output DIR`` writes ``DIR/index.html``).

    python -m p2ch_luna.view DIR                 # in this machine's web browser
    python -m p2ch_luna.view DIR --serve [--port N]   # on http://127.0.0.1:N/ (for a remote machine: ssh -L)

The page needs no server: ``--serve`` is for a browser on another machine, through an ssh tunnel to this
loopback address. It uses the standard library's ``http.server`` and serves ``DIR`` only, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import logging
import sys
import webbrowser
from pathlib import Path
from typing import Sequence

from p2ch_luna.cli import make_parser, non_negative_int, run_command
from p2ch_luna.errors import DataError, UsageError
from p2ch_luna.viewer.page import PAGE_FILE

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
LOOPBACK = "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m p2ch_luna.view", "Open the viewer page (index.html) of a diagnosis folder.",
                         paths=False)
    parser.add_argument("folder", type=Path, metavar="DIR", help="a folder that diagnose --output wrote")
    parser.add_argument("--serve", action="store_true",
                        help=f"serve DIR on http://{LOOPBACK}:PORT/ with the standard library and print that "
                             "address, instead of opening a browser (for a remote machine: ssh -L PORT:"
                             f"{LOOPBACK}:PORT)")
    parser.add_argument("--port", type=non_negative_int, default=DEFAULT_PORT,
                        help="with --serve: the port (0: any free one)")
    return parser


def page_path(folder: Path) -> Path:
    """``folder/index.html``, or a DataError saying how to make it."""
    page = Path(folder) / PAGE_FILE
    if not page.is_file():
        raise DataError(f"{page} does not exist: run python -m p2ch_luna.diagnose ... --output {folder} "
                        "(without --no-viewer)")
    return page


def make_server(folder: Path, port: int) -> http.server.ThreadingHTTPServer:
    """An HTTP server of ``folder`` on the loopback address (not started)."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    try:
        return http.server.ThreadingHTTPServer((LOOPBACK, port), handler)
    except OSError as error:
        raise UsageError(f"--port {port}: cannot listen on {LOOPBACK}:{port}: {error.strerror or error}") from error


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Logs requests through ``logging`` at DEBUG instead of printing each to stderr."""

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def run(args: argparse.Namespace) -> int:
    page = page_path(args.folder)
    if args.port > 65535:
        raise UsageError(f"--port {args.port}: ports go up to 65535")
    if not args.serve:
        url = page.resolve().as_uri()
        if webbrowser.open(url):
            print(f"opened {url}")
        else:
            print(f"no web browser found here; open {url}, or serve it with --serve")
        return 0
    with make_server(args.folder, args.port) as server:
        print(f"serving {args.folder} on http://{LOOPBACK}:{server.server_address[1]}/{PAGE_FILE} (Ctrl-C stops)",
              flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
