"""The CT in an upload's files: one NIfTI, a ``.mhd`` with its ``.raw``, a ``.mha``, or a zip of a DICOM series.

A zip is checked before anything is written (member names inside the archive, no links, at most
``MAX_ZIP_MEMBERS`` members and ``max_unpacked_bytes`` declared in all) and its members are written flat into
one folder under numbered names, counting the bytes actually inflated (declared sizes can lie). A ``.mhd``
must name its uploaded data file by a plain name, so that it reads nothing outside the upload's folder.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from p2ch_luna.io.metaimage import read_metaimage_header
from p2ch_luna.serve.receive import UploadError

MAX_ZIP_MEMBERS = 10_000
"""Most files a DICOM zip may hold (a CT series has hundreds of slices, rarely a few thousand)."""
COPY_CHUNK = 1 << 20
NIFTI_SUFFIXES = (".nii", ".nii.gz")
EXPECTED = "expected one .nii/.nii.gz, a .mhd with its .raw, a .mha, or a .zip of a DICOM series"


def find_ct(files: list[Path], unpack_folder: Path, max_unpacked_bytes: int) -> Path:
    """The path ``load_ct`` reads for these uploaded files (a zip is unpacked into ``unpack_folder``)."""
    names = sorted(path.name for path in files)
    lower = [name.lower() for name in names]
    by_name = {path.name: path for path in files}
    if len(files) == 1 and lower[0].endswith(NIFTI_SUFFIXES + (".mha",)):
        return files[0]
    if len(files) == 1 and lower[0].endswith(".zip"):
        unpack_zip(files[0], unpack_folder, max_unpacked_bytes)
        return unpack_folder
    headers = [name for name in names if name.lower().endswith(".mhd")]
    if len(headers) == 1 and len(files) == 2:
        header = by_name[headers[0]]
        data_file = read_metaimage_header(header).get("ElementDataFile", "")
        other = next(name for name in names if name != headers[0])
        if data_file != other:
            raise UploadError(400, f"{header.name} names its data file {data_file[:80]!r}, but the other file "
                                   f"sent is {other!r}")
        return header
    raise UploadError(415, f"got {', '.join(names)}: {EXPECTED}")


def unpack_zip(archive: Path, folder: Path, max_unpacked_bytes: int) -> None:
    """Write the zip's files flat into ``folder``, after the checks in the module docstring."""
    try:
        with zipfile.ZipFile(archive) as opened:
            members = [info for info in opened.infolist() if not info.is_dir()]
            _check_members(archive.name, members, max_unpacked_bytes)
            folder.mkdir()
            written = 0
            for number, info in enumerate(members):
                with opened.open(info) as source, open(folder / f"{number:05d}.dcm", "xb") as target:
                    while chunk := source.read(COPY_CHUNK):
                        written += len(chunk)
                        if written > max_unpacked_bytes:
                            raise _too_large(archive.name, max_unpacked_bytes)
                        target.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise UploadError(422, f"{archive.name} is not a readable zip: {error}") from None
    except (NotImplementedError, RuntimeError) as error:  # unsupported compression, encryption
        raise UploadError(422, f"{archive.name} cannot be unpacked: {error}") from None
    except UploadError:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _check_members(archive_name: str, members: list[zipfile.ZipInfo], max_unpacked_bytes: int) -> None:
    if not members:
        raise UploadError(422, f"{archive_name} holds no file")
    if len(members) > MAX_ZIP_MEMBERS:
        raise UploadError(413, f"{archive_name} holds {len(members)} files, more than {MAX_ZIP_MEMBERS}")
    for info in members:
        name = info.filename.replace("\\", "/")
        parts = PurePosixPath(name).parts
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts or "\0" in name:
            raise UploadError(400, f"{archive_name}: member {info.filename[:80]!r} points outside the archive's "
                                   "folder (absolute or '..')")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UploadError(400, f"{archive_name}: member {info.filename[:80]!r} is a symbolic link")
    if sum(info.file_size for info in members) > max_unpacked_bytes:
        raise _too_large(archive_name, max_unpacked_bytes)


def _too_large(archive_name: str, max_unpacked_bytes: int) -> UploadError:
    return UploadError(413, f"{archive_name} unpacks to more than {max_unpacked_bytes} bytes (--max-unpacked-mib)")
