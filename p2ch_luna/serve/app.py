"""The FastAPI application: ``POST /diagnose``, ``GET /health`` and each run's files under ``GET /runs/ID/``."""

from __future__ import annotations

import asyncio
import logging
import shutil

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from p2ch_luna.serve.receive import MultipartReceiver, UploadError
from p2ch_luna.serve.service import DiagnosisService

log = logging.getLogger(__name__)

SERIES_UID_FIELD = "series_uid"


def create_app(service: DiagnosisService, max_upload_bytes: int) -> FastAPI:
    app = FastAPI(title="p2ch_luna diagnosis", description="Lung-nodule diagnosis of an uploaded chest CT.")

    @app.exception_handler(UploadError)
    async def refused(request: Request, error: UploadError) -> JSONResponse:
        log.info("refused %s %s: %s", request.method, request.url.path, error)
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:  # logged with its traceback by uvicorn
        return JSONResponse({"detail": f"internal error ({type(error).__name__}): see the server's log"},
                            status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "device": str(service.device), "models": service.models.describe()}

    @app.post("/diagnose")
    async def diagnose(request: Request) -> dict:
        """Diagnose the CT sent as multipart files; returns report.json with the run's id, timings and links."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload_bytes:
            raise UploadError(413, f"the upload is {length} bytes, more than the limit of {max_upload_bytes} "
                                   "(--max-upload-mib)")
        run_id, folder = service.new_upload()
        try:
            receiver = MultipartReceiver(request.headers.get("content-type", ""), folder, max_upload_bytes)
            await receiver.receive(request.stream())
            unknown = sorted(set(receiver.fields) - {SERIES_UID_FIELD})
            if unknown:
                raise UploadError(400, f"unknown form field(s) {', '.join(unknown)} (only {SERIES_UID_FIELD})")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        result = await asyncio.wrap_future(service.submit(run_id, receiver.files,
                                                          receiver.fields.get(SERIES_UID_FIELD, "")))
        files_url = str(request.url_for("runs", path=f"{run_id}/"))
        has_viewer = result.pop("has_viewer")
        return {**result, "files": files_url, "viewer": files_url + "index.html" if has_viewer else None}

    app.mount("/runs", StaticFiles(directory=service.runs_dir, html=True), name="runs")
    return app
