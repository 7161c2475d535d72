"""The derived PET series is conformant DICOM (issue 16): dciodvfy (dicom3tools) reports no error, ImageType is
DERIVED\\PRIMARY, ContentDate/ContentTime are the creation time, files are written in InstanceNumber order, and
ITK and dcm2niix read it back to the same SUV as our own reader.

dciodvfy and dcm2niix are Debian packages (`apt-get install -y dicom3tools dcm2niix`, see README); the tests that
need them skip with that reason when they are absent. The header rules are tested without them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pet_dicom_factory as factory
import pydicom
import pytest

from scripts.data.suv import read_pet_series
from scripts.inference.dicom_writer import write_derived_pet_series

DCIODVFY = shutil.which("dciodvfy")
DCM2NIIX = shutil.which("dcm2niix")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (apt-get install -y dicom3tools)")
needs_dcm2niix = pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix not installed (apt-get install -y dcm2niix)")


def dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def real_derived(tmp_path_factory, real_pet_dir):
    """A derived series of 12 slices of the real GE series (a smoothed copy as the 'denoised' volume)."""
    from scipy.ndimage import gaussian_filter

    tmp = tmp_path_factory.mktemp("conf")
    factory.copy_real_slices(real_pet_dir, tmp / "src", count=12, first=120)
    source = read_pet_series(tmp / "src")
    denoised = gaussian_filter(source.suv.astype(np.float64), 1.0).astype(np.float32)
    headers = source.datasets  # the reader's one slice sort
    files = write_derived_pet_series(denoised, headers, source.suv_factor, tmp / "out", model_version="0.0.test")
    return tmp, source, denoised, headers, files


def test_header_rules_on_the_real_series(real_derived):
    tmp, source, _, headers, files = real_derived
    src_by_uid = {h.SOPInstanceUID: h for h in headers}
    written = sorted((tmp / "out").iterdir())
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in written]
    numbers = [int(ds.InstanceNumber) for ds in datasets]
    assert numbers == sorted(numbers), "files IM00001, IM00002, ... must follow InstanceNumber"
    assert [int(h.InstanceNumber) for h in headers] != sorted(int(h.InstanceNumber) for h in headers), (
        "the test needs a source whose slice-position order is not its instance order (the GE series is)"
    )
    for ds in datasets:
        src = src_by_uid[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert list(ds.ImageType) == ["DERIVED", "PRIMARY"]
        assert ds.ContentDate == ds.InstanceCreationDate and ds.ContentTime == ds.InstanceCreationTime
        assert (ds.ContentDate, ds.ContentTime) != (src.get("ContentDate"), src.get("ContentTime")), (
            "copied, not created"
        )
        assert int(ds.InstanceNumber) == int(src.InstanceNumber)
        assert "PatientPosition" not in ds and "PatientOrientationCodeSequence" in ds
        assert (
            ds.SeriesTime == src.SeriesTime and ds.AcquisitionTime == src.AcquisitionTime
        )  # SUV decay keeps its times
    assert read_pet_series(tmp / "out").suv_factor == source.suv_factor


@needs_dciodvfy
def test_dciodvfy_reports_no_error_on_the_derived_real_series(real_derived):
    tmp, *_ = real_derived
    for f in sorted((tmp / "out").iterdir()):
        assert dciodvfy_errors(f) == [], f.name
    # and the check can fail: the source slices carry errors (PatientPosition beside the PET code sequence, ...)
    assert dciodvfy_errors(sorted((tmp / "src").iterdir())[0]), "dciodvfy found nothing on the source: is it checking?"


@needs_dciodvfy
def test_the_writer_adds_no_dciodvfy_error_to_a_minimal_source(tmp_path):
    """The test factory's series lacks Type 2 patient/study attributes (the writer must not invent them): the
    derived series may keep those errors of its source, and must not add any."""
    suv = np.random.default_rng(0).gamma(2.0, 0.8, (10, 8, 4))
    factory.write_synthetic_series(tmp_path / "src", suv / factory.expected_factor())
    syn = read_pet_series(tmp_path / "src")
    headers = syn.datasets
    files = write_derived_pet_series(syn.suv, headers, syn.suv_factor, tmp_path / "out")
    src_files = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in (tmp_path / "src").iterdir()}
    for f in files:
        ref = pydicom.dcmread(f, stop_before_pixels=True).SourceImageSequence[0].ReferencedSOPInstanceUID
        added = set(dciodvfy_errors(f)) - set(dciodvfy_errors(src_files[ref]))
        assert not added, (f.name, sorted(added))


def test_itk_reads_the_same_suv(real_derived):
    itk = pytest.importorskip("itk")
    tmp, source, denoised, _, _ = real_derived
    ours = read_pet_series(tmp / "out")
    names = itk.GDCMSeriesFileNames.New()
    names.SetDirectory(str(tmp / "out"))
    files = names.GetFileNames(names.GetSeriesUIDs()[0])
    image = itk.imread(files, itk.F)
    bqml = itk.array_view_from_image(image).astype(np.float64)  # (z, y, x) in the reader's slice order
    suv_itk = np.transpose(bqml, (2, 1, 0)) * ours.suv_factor
    if not np.allclose(suv_itk[:, :, 0], ours.suv[:, :, 0], atol=1e-3):  # ITK may stack the slices the other way
        suv_itk = suv_itk[:, :, ::-1]
    np.testing.assert_allclose(suv_itk, ours.suv, atol=1e-4 * float(np.abs(ours.suv).max()))
    tol = np.abs(denoised).max(axis=(0, 1)) / 32767 * 0.5 * (1 + 1e-6) + 1e-5
    assert np.all(np.abs(suv_itk - denoised).max(axis=(0, 1)) <= tol)


@needs_dcm2niix
def test_dcm2niix_reads_the_same_suv(real_derived, tmp_path):
    tmp, _, denoised, _, _ = real_derived
    ours = read_pet_series(tmp / "out")
    proc = subprocess.run(
        [DCM2NIIX, "-z", "n", "-f", "conv", "-o", str(tmp_path), str(tmp / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    img = nib.load(str(tmp_path / "conv.nii"))
    bqml = np.asarray(img.dataobj, dtype=np.float64)  # dcm2niix applies the per-slice slopes (float output)
    # compare in world space: dcm2niix writes its own (LAS/RAS) storage order, our reader's affine says ours
    m = np.linalg.solve(ours.affine, img.affine)  # dcm2niix voxel -> our voxel
    idx = np.indices(bqml.shape).reshape(3, -1)
    mapped = np.rint(m[:3, :3] @ idx + m[:3, 3:4]).astype(int)
    assert np.allclose(m[:3, :3] @ idx + m[:3, 3:4], mapped, atol=1e-3), "dcm2niix grid is not our grid"
    suv_ours = ours.suv[tuple(mapped)].reshape(bqml.shape).astype(np.float64)
    np.testing.assert_allclose(bqml * ours.suv_factor, suv_ours, atol=1e-4 * float(np.abs(ours.suv).max()))
