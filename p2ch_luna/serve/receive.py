"""Receive a multipart upload into one folder, byte by byte under a size limit (no temporary file elsewhere)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import AsyncIterator

from p2ch_luna.errors import DataError

SAFE_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+-]{0,199}\Z")
"""Uploaded file names kept as they are: a plain name, no folder, no leading dot."""


class UploadError(DataError):
    """A refused upload: ``status`` is the HTTP status, the message the response's one-line ``detail``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def checked_file_name(name: str) -> str:
    """``name`` when it is a plain file name (letters, digits, ``._+-``), else a 400 UploadError."""
    if not SAFE_NAME.match(name) or ".." in name:
        raise UploadError(400, f"file name {name[:80]!r}: expected a plain name (letters, digits, '._+-'), "
                               "no folder")
    return name


class MultipartReceiver:
    """Writes each file part of a ``multipart/form-data`` body to ``folder/<its name>``; keeps text fields."""

    def __init__(self, content_type: str, folder: Path, max_bytes: int) -> None:
        from python_multipart.multipart import MultipartParser, parse_options_header

        kind, options = parse_options_header(content_type)
        if kind != b"multipart/form-data" or b"boundary" not in options:
            raise UploadError(400, "expected a multipart/form-data request (e.g. curl -F ct=@scan.nii.gz)")
        self.folder = folder
        self.max_bytes = max_bytes
        self.received = 0
        self.files: list[Path] = []
        self.fields: dict[str, str] = {}
        self._parse_options_header = parse_options_header
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._handle = None
        self._field_name = ""
        self._field_value = bytearray()
        self._parser = MultipartParser(options[b"boundary"], {
            "on_part_begin": self._part_begin, "on_part_data": self._part_data, "on_part_end": self._part_end,
            "on_header_field": self._header_field, "on_header_value": self._header_value_part,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
        })

    async def receive(self, stream: AsyncIterator[bytes]) -> None:
        """Feed the whole body; a 413 UploadError as soon as it passes ``max_bytes``."""
        try:
            async for chunk in stream:
                self.received += len(chunk)
                if self.received > self.max_bytes:
                    raise UploadError(413, f"the upload is larger than the limit of {self.max_bytes} bytes "
                                           "(--max-upload-mib)")
                self._parser.write(chunk)
            self._parser.finalize()
        except UploadError:
            raise
        except Exception as error:  # python_multipart's parse errors
            raise UploadError(400, f"malformed multipart body: {error}") from None
        finally:
            if self._handle is not None:
                self._handle.close()
        if not self.files:
            raise UploadError(400, "the request holds no file: send the CT as a file field "
                                   "(curl -F ct=@scan.nii.gz, or -F ct=@scan.mhd -F ct=@scan.raw)")

    def _part_begin(self) -> None:
        self._disposition = b""
        self._field_name = ""
        self._field_value = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_part(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = self._parse_options_header(self._disposition)
        self._field_name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            return
        name = checked_file_name(options[b"filename"].decode("utf-8", "replace"))
        path = self.folder / name
        if path.exists():
            raise UploadError(400, f"file {name} is sent twice")
        self.files.append(path)
        self._handle = open(path, "xb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._handle is not None:
            self._handle.write(data[start:end])
        else:
            self._field_value += data[start:end]
            if len(self._field_value) > 1000:
                raise UploadError(400, f"form field {self._field_name!r} is longer than 1000 bytes")

    def _part_end(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        else:
            self.fields[self._field_name] = self._field_value.decode("utf-8", "replace")
