"""Size of the diagnose nodule-mask file for one CT: uncompressed MetaImage against gzip NIfTI and DICOM-SEG.

Usage: python -m bench.bench_mask_file CT (a DICOM folder, .mhd or .nii.gz)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Sequence

from p2ch_luna.io.ct import load_ct, write_metaimage
from p2ch_luna.io.dicom_seg import read_dicom_source, write_dicom_seg
from p2ch_luna.io.mask import write_nifti_mask
from p2ch_luna.synth.masks import sample_nodule_mask


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_mask_file", description=__doc__.splitlines()[0])
    parser.add_argument("ct", type=Path, help="the CT whose shape and geometry the mask takes")
    args = parser.parse_args(argv)
    ct = load_ct(args.ct)
    mask = sample_nodule_mask(ct.hu.shape)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_metaimage(mask, ct.geometry, folder / "mask.mhd")
        write_nifti_mask(mask, ct.geometry, folder / "mask.nii.gz")
        metaimage = (folder / "mask.mhd").stat().st_size + (folder / "mask.raw").stat().st_size
        nifti = (folder / "mask.nii.gz").stat().st_size
        source = read_dicom_source(args.ct, ct.series_uid, ct.geometry) if args.ct.is_dir() else None
        write_dicom_seg(mask, ct.geometry, folder / "mask.dcm", source)
        seg = (folder / "mask.dcm").stat().st_size
    print(f"shape {ct.hu.shape}, {int(mask.sum())} mask voxels: .mhd+.raw {metaimage:,} bytes, "
          f".nii.gz {nifti:,} bytes, DICOM-SEG {seg:,} bytes")


if __name__ == "__main__":
    main()
