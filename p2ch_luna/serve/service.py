"""Diagnoses of uploaded CTs, one at a time: the models loaded once, one worker thread, one folder per run.

Work folder layout: ``uploads/ID/`` holds a request's files while it is handled and is removed after it
(whatever the outcome); ``runs/ID/`` holds a successful run's outputs (report.json, findings.csv, nodules.csv,
figures, the viewer page ``index.html``), kept until removed by hand.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from p2ch_luna.diagnose import report
from p2ch_luna.diagnose.model_set import DiagnosisModels
from p2ch_luna.diagnose.pipeline import DiagnoseConfig, diagnose_series
from p2ch_luna.errors import LunaError
from p2ch_luna.serve.receive import UploadError
from p2ch_luna.serve.unpack import find_ct

log = logging.getLogger(__name__)

UPLOADS_FOLDER = "uploads"
RUNS_FOLDER = "runs"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


class DiagnosisService:
    """Runs :func:`p2ch_luna.diagnose.pipeline.diagnose_series` and :func:`report.write_outputs` (what
    ``diagnose --ct PATH --output DIR`` runs) in one worker thread: requests queue in arrival order."""

    def __init__(self, models: DiagnosisModels, config: DiagnoseConfig, device: torch.device, work_dir: Path,
                 max_unpacked_bytes: int) -> None:
        self.models = models
        self.config = config
        self.device = device
        self.uploads_dir = work_dir / UPLOADS_FOLDER
        self.runs_dir = work_dir / RUNS_FOLDER
        self.max_unpacked_bytes = max_unpacked_bytes
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="diagnosis")
        shutil.rmtree(self.uploads_dir, ignore_errors=True)  # left by a server that was killed
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(parents=True, exist_ok=True)

    def new_upload(self) -> tuple[str, Path]:
        """A fresh run id and its (empty) upload folder."""
        run_id = uuid.uuid4().hex
        folder = self.uploads_dir / run_id
        folder.mkdir()
        return run_id, folder

    def submit(self, run_id: str, files: list[Path], series_uid: str) -> concurrent.futures.Future:
        """Queue the diagnosis of the uploaded ``files``; the future gives :meth:`diagnose`'s result."""
        return self.worker.submit(self.diagnose, run_id, files, series_uid, time.perf_counter())

    def diagnose(self, run_id: str, files: list[Path], series_uid: str, queued_at: float) -> dict[str, Any]:
        """Diagnose the CT in ``files`` into ``runs/RUN_ID``; returns report.json and the run's timings."""
        started_at, started = utc_now(), time.perf_counter()
        upload = self.uploads_dir / run_id
        output = self.runs_dir / run_id
        try:
            ct_path = find_ct(files, upload / "unpacked", self.max_unpacked_bytes)
            results = diagnose_series([(series_uid, ct_path)], self.models, self.config, self.device, figures=True,
                                      save_mask=False, show_progress=False, viewer=True)
            scores = report.score(results, None, [], self.config)
            summary = report.Summary(config=self.config, models=self.models.describe(), device=str(self.device),
                                     world_size=1, wall_s=time.perf_counter() - started)
            report.write_outputs(output, results, scores, self.config, summary)
            report_json = json.loads((output / report.REPORT_FILE).read_text())
        except UploadError:
            shutil.rmtree(output, ignore_errors=True)
            raise
        except LunaError as error:  # a file that is not a readable CT: its message without our folders
            shutil.rmtree(output, ignore_errors=True)
            raise UploadError(422, str(error).replace(f"{upload}/unpacked", "the zip").replace(f"{upload}/", ""))
        except BaseException:
            shutil.rmtree(output, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(upload, ignore_errors=True)
        log.info("run %s: %d series diagnosed in %.1f s", run_id, len(results), time.perf_counter() - started)
        return {"run_id": run_id, "queued_s": started - queued_at, "started": started_at, "finished": utc_now(),
                "has_viewer": (output / report.PAGE_FILE).is_file(), "report": report_json}

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)
