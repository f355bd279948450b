"""Serve the diagnosis over HTTP (FastAPI + uvicorn, the ``[serve]`` extra).

    python -m p2ch_luna.serve --models-dir DIR [--host 127.0.0.1 --port 8000] [--work-dir DIR]
    curl -F ct=@scan.nii.gz http://127.0.0.1:8000/diagnose
    curl -F ct=@scan.mhd -F ct=@scan.raw http://127.0.0.1:8000/diagnose
    curl -F ct=@dicom_series.zip [-F series_uid=UID] http://127.0.0.1:8000/diagnose

``POST /diagnose`` answers ``{"run_id", "queued_s", "started", "finished", "files", "viewer", "report"}``:
``report`` is the run's report.json (what ``diagnose --ct PATH --output DIR`` writes), ``files`` the URL of
the run's folder (``GET /runs/ID/report.json``, ``findings.csv``, ...) and ``viewer`` its viewer page.
A refused upload gets a 4xx with ``{"detail": "<one line>"}``: 400 malformed (unsafe names, a zip member
outside its folder), 413 too large (the request or a zip's contents), 415 not a CT's file types, 422 files
that are not a readable CT (truncated ``.raw``, garbage). ``GET /health`` names the device and models.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Sequence

from p2ch_luna import RESEARCH_NOTICE
from p2ch_luna.cli import add_device_argument, make_parser, non_negative_int, positive_int, run_command
from p2ch_luna.errors import UsageError
from p2ch_luna.paths import PATH_SPECS, default_data_home, resolve_paths

log = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_PORT = 8000
WORK_FOLDER = "serve"
"""Default --work-dir, under data-unversioned/."""


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "python -m p2ch_luna.serve",
        "An HTTP service of the diagnosis: POST /diagnose takes a CT (.mhd + .raw, .mha, NIfTI, or a zip of a "
        "DICOM series) as multipart files and answers the report JSON with links to the run's files and viewer "
        "page; GET /health. The models are loaded once, at start. Requests are diagnosed one at a time, in "
        "arrival order, by one worker thread (never two diagnoses on the same cores at once); the others wait "
        "in its queue. " + RESEARCH_NOTICE, paths=False)
    models_spec = next(spec for spec in PATH_SPECS if spec.attribute == "models_dir")
    parser.add_argument("--models-dir", dest="models_dir", metavar="DIR",
                        help=f"the newest segmentation, nodule and malignancy checkpoints in DIR are used "
                             f"(env {models_spec.env}; default data-unversioned/{models_spec.default_relative})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every interface; there is no authentication)")
    parser.add_argument("--port", type=non_negative_int, default=DEFAULT_PORT, help="port (0: any free one)")
    parser.add_argument("--work-dir", type=Path, metavar="DIR",
                        help=f"uploads go to DIR/uploads/ID/ (removed once answered), outputs to DIR/runs/ID/ "
                             f"(kept, served at /runs/ID/); one server per DIR (default "
                             f"data-unversioned/{WORK_FOLDER})")
    parser.add_argument("--max-upload-mib", type=positive_int, default=1024,
                        help="largest request body in MiB; larger ones get 413")
    parser.add_argument("--max-unpacked-mib", type=positive_int, default=4096,
                        help="largest total size in MiB of the files in an uploaded zip; larger ones get 413 "
                             "(zip bombs)")
    add_device_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError as error:
        raise UsageError(f"serve needs the [serve] extra ({error.name} is missing): pip install -e '.[serve]'") from None
    from p2ch_luna.diagnose.model_set import load_models
    from p2ch_luna.diagnose.pipeline import DiagnoseConfig
    from p2ch_luna.diagnose.segment import CPU_SEGMENTATION_BATCH, CUDA_SEGMENTATION_BATCH
    from p2ch_luna.distributed import distributed_info_from_env, resolve_device
    from p2ch_luna.io.lock import folder_lock
    from p2ch_luna.serve.app import create_app
    from p2ch_luna.serve.service import DiagnosisService

    if args.port > 65535:
        raise UsageError(f"--port {args.port}: ports go up to 65535")
    work_dir = (args.work_dir or default_data_home() / WORK_FOLDER).expanduser().resolve()
    device = resolve_device(args.device, distributed_info_from_env())
    batch = CUDA_SEGMENTATION_BATCH if device.type == "cuda" else CPU_SEGMENTATION_BATCH
    config = DiagnoseConfig(batch_size=batch)
    models = load_models(resolve_paths(models_dir=args.models_dir), None, None, None, device)
    try:
        listener = socket.create_server((args.host, args.port))
    except OSError as error:
        raise UsageError(f"--host {args.host} --port {args.port}: cannot listen there: "
                         f"{error.strerror or error}") from error
    with folder_lock(work_dir, "--work-dir"), listener:
        service = DiagnosisService(models, config, device, work_dir, args.max_unpacked_mib * MIB)
        app = create_app(service, args.max_upload_mib * MIB)
        host, port = listener.getsockname()[:2]
        print(f"serving on http://{host}:{port}/ (work folder {work_dir}; Ctrl-C stops)", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level.lower(), log_config=None))
        # uvicorn stops on SIGTERM, then raises it again under the handler it found: a no-op one lets this
        # process leave its with blocks (the --work-dir lock is removed) and exit 0.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:
            server.run(sockets=[listener])
        finally:
            signal.signal(signal.SIGTERM, previous)
            service.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
