"""Per-study QC report (issue 16) and one-file denoising: the numbers, the warnings, the picture, the output set.

Unit tests of the measurements on hand-built volumes (known answers), then whole runs of
configs/inference.json with a tiny network: a single NIfTI file as --dataset_dir, the QC files counted in
the output set (refused without --overwrite, nothing kept when writing the report fails), the sidecar's
input SUVmax and stage times, ``python -m scripts.denoise``, and the real FDG series.
"""

from __future__ import annotations

import errno
import json
import logging

import nibabel as nib
import numpy as np
import pytest

from conftest import run_inference_in_process, run_python
from scripts.common.errors import UniPETInputError
from scripts.data.io import save_nifti
from scripts.data.suv import read_pet_series
from scripts.inference import qc as qcmod
from scripts.inference.qc import analyse_input, compare_output, find_hotspots

TINY = dict(channels=2, num_blocks=1, latent_dim=4, san_channels=[2], patch_size=[16, 16, 16])
TINY_CLI = [
    "--channels",
    "2",
    "--num_blocks",
    "1",
    "--latent_dim",
    "4",
    "--san_channels",
    "[2]",
    "--patch_size",
    "[16,16,16]",
]


def body_with_foci(shape=(40, 36, 30), spacing=4.0):
    """A flat 1.0 SUV body in air, a uniform 2.0 SUV 'liver' block in the patient's right half (x high in RAS),
    and two hot foci: 12 SUV (3x3x3 voxels) and 8 SUV (one voxel), far apart."""
    suv = np.full(shape, 0.05, np.float32)
    suv[4:-4, 4:-4, 2:-2] = 1.0
    suv[24:34, 8:20, 8:20] = 2.0  # liver-like, patient's right half (RAS x index > centre)
    suv[9:12, 20:23, 14:17] = 12.0
    suv[15, 26, 22] = 8.0
    return suv, np.diag([spacing, spacing, spacing, 1.0])


def test_hotspots_are_local_maxima_above_the_threshold_and_apart():
    suv, aff = body_with_foci()
    spots = find_hotspots(suv, np.array([4.0] * 3), count=5, min_suv=4.0, separation_mm=20.0)
    assert len(spots) == 2, spots  # the 27 voxels of the 12-SUV cube are one focus
    assert 9 <= spots[0][0] <= 11 and spots[1] == (15, 26, 22)
    assert find_hotspots(suv, np.array([4.0] * 3), count=5, min_suv=13.0, separation_mm=20.0) == []


def test_hotspots_found_in_slabs_equal_the_whole_volume_search(monkeypatch):
    rng = np.random.default_rng(5)
    suv = (rng.gamma(2.0, 1.5, (30, 26, 22))).astype(np.float32)
    spacing = np.array([3.0, 2.5, 4.0])
    whole = find_hotspots(suv, spacing, count=8, min_suv=6.0, separation_mm=12.0)
    monkeypatch.setattr(qcmod, "_SLAB_VOXELS", 26 * 22 * 3)  # 3 planes per slab: halo larger than the slab
    assert find_hotspots(suv, spacing, count=8, min_suv=6.0, separation_mm=12.0) == whole and len(whole) == 8


def test_body_total_is_kept_by_a_count_keeping_filter():
    """A Gaussian filter that keeps every count keeps the QC's body total (the body hull); the 0.4.0 body (input
    above 0.3 SUV alone) lost activity under it: noise-selected voxels and the skin edge."""
    from scipy import ndimage

    suv, aff = body_with_foci()
    noisy = suv * (1.0 + 0.3 * np.random.default_rng(1).standard_normal(suv.shape)).clip(0.0)
    before = analyse_input(noisy, aff)
    smooth = ndimage.gaussian_filter(noisy, 1.0, mode="reflect")
    n = compare_output(before, smooth)["numbers"]
    assert abs(n["fov_total_change_pct"]) < 1e-4 and abs(n["body_total_change_pct"]) < 0.3, n
    thresholded = noisy > 0.3
    old = 100.0 * (smooth[thresholded].sum() / noisy[thresholded].sum() - 1.0)
    assert old < -1.0, old
    assert n["body_margin_mm"] == 12.0


def test_numbers_before_and_after_are_measured_on_the_same_voxels():
    suv, aff = body_with_foci()
    before = analyse_input(suv, aff)
    out = suv.copy()
    out[9:12, 20:23, 14:17] = 9.0  # focus 1 lowered by 25 %
    out[4:-4, 4:-4, 2:-2] *= 1.0  # body otherwise unchanged
    n = compare_output(before, out)["numbers"]
    f1, f2 = n["hotspots"]
    assert f1["before"]["suv_max"] == pytest.approx(12.0) and f1["after"]["suv_max"] == pytest.approx(9.0)
    assert f1["change_pct"]["suv_max"] == pytest.approx(-25.0) and f1["change_pct"]["suv_mean"] == pytest.approx(-25.0)
    assert f2["change_pct"]["suv_max"] == pytest.approx(0.0)
    from scripts.data.body import body_hull

    body = body_hull(suv > 0.3, aff)  # the QC counts the body hull (see the next test for why)
    expected = (
        100.0 * (out[body].sum(dtype=np.float64) - suv[body].sum(dtype=np.float64)) / suv[body].sum(dtype=np.float64)
    )
    assert n["body_total_change_pct"] == pytest.approx(expected, rel=1e-9) and expected < 0
    assert n["input_suv_max"] == pytest.approx(12.0)
    ref = n["reference_region"]  # the automatic liver-like cube lands in the uniform 2.0 block
    assert ref["before"]["suv_mean"] == pytest.approx(2.0) and ref["before"]["cov_pct"] == pytest.approx(0.0, abs=1e-6)
    assert 24 * 4.0 <= ref["centre_mm"][0] <= 34 * 4.0


def test_a_given_liver_centre_is_used_and_reported_as_liver():
    suv, aff = body_with_foci()
    rng = np.random.default_rng(0)
    noisy = suv + rng.normal(0.0, 0.2, suv.shape).astype(np.float32) * (suv > 0.5)
    before = analyse_input(noisy, aff, liver_center_mm=[29 * 4.0, 14 * 4.0, 14 * 4.0])
    n = compare_output(before, suv)["numbers"]  # a perfect denoiser: the noise is gone
    assert "liver" in n and "reference_region" not in n
    assert n["liver"]["before"]["cov_pct"] > 5.0 and n["liver"]["after"]["cov_pct"] == pytest.approx(0.0, abs=1e-6)
    assert n["liver"]["after"]["suv_mean"] == pytest.approx(2.0)


def test_the_same_numbers_whatever_the_storage_order():
    """Stored flipped and transposed (with the matching affine), the study gives the same report."""
    suv, aff = body_with_foci()
    a = compare_output(analyse_input(suv, aff), suv * 0.99)["numbers"]
    flipped = np.ascontiguousarray(np.transpose(suv[::-1], (2, 0, 1)))
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    # stored axis 0 = RAS z, 1 = RAS x reversed, 2 = RAS y
    m[2, 0], m[0, 1], m[1, 2] = 4.0, -4.0, 4.0
    m[0, 3] = 4.0 * (suv.shape[0] - 1)
    b = compare_output(analyse_input(flipped, m), flipped * 0.99)["numbers"]
    for key in ("body_total_change_pct", "input_suv_max", "body_volume_ml"):
        assert a[key] == pytest.approx(b[key], rel=1e-9)
    assert [s["mm"] for s in a["hotspots"]] == [s["mm"] for s in b["hotspots"]]
    assert a["reference_region"]["centre_mm"] == pytest.approx(b["reference_region"]["centre_mm"])


# --------------------------------------------------------------------------------------------- whole runs


run_in_process = run_inference_in_process


def input_error(fn, *args, **kwargs) -> UniPETInputError:
    """Run ``fn``; return the UniPETInputError it raised (MONAI's config wraps it in a RuntimeError in-process)."""
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    exc: BaseException | None = info.value
    while exc is not None and not isinstance(exc, UniPETInputError):
        exc = exc.__cause__ or exc.__context__
    assert exc is not None, f"not a UniPETInputError: {info.value!r}"
    return exc


def untrained(**kw):
    return {"checkpoint": "", "allow_untrained": True, **TINY, **kw}


def test_one_nifti_file_as_dataset_dir_gets_outputs_and_a_qc_report(tmp_path, caplog):
    suv, aff = body_with_foci()
    src = save_nifti(suv, aff, tmp_path / "in" / "study1.nii.gz")
    save_nifti(suv, aff, tmp_path / "in" / "other.nii.gz")  # beside it, not denoised: only the file given is
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        run_in_process(dataset_dir=str(src), output_dir=str(out), **untrained(qc_max_body_total_change_pct=-1.0))
    assert sorted(p.name for p in out.iterdir()) == [
        "study1_denoised.json",
        "study1_denoised.nii.gz",
        "study1_denoised_qc.json",
        "study1_denoised_qc.png",
    ]
    side = json.loads((out / "study1_denoised.json").read_text())
    assert side["input_suv_max"] == pytest.approx(12.0)
    assert set(side["timing_s"]) == {
        "read_and_preprocess_s",
        "qc_input_analysis_s",
        "network_and_correction_to_input_grid_s",
        "write_outputs_s",
    }
    assert all(v >= 0 for v in side["timing_s"].values())
    assert side["qc_report"] == {"png": "study1_denoised_qc.png", "json": "study1_denoised_qc.json"}
    report = json.loads((out / "study1_denoised_qc.json").read_text())
    assert report["model"]["trained"] is False and len(report["hotspots"]) == 2
    png = (out / "study1_denoised_qc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 400_000
    text = caplog.text
    assert "QC study1: body total" in text
    # a threshold below any change (-1 %) must name the study and the quantity in a WARNING line
    warn = [
        r for r in caplog.records if r.levelno == logging.WARNING and "body total activity changed" in r.getMessage()
    ]
    assert (
        len(warn) == 1 and "study1" in warn[0].getMessage() and "qc_max_body_total_change_pct" in warn[0].getMessage()
    )
    assert report["warnings"] and "body total" in report["warnings"][0]


def test_qc_files_are_part_of_the_output_set(tmp_path):
    suv, aff = body_with_foci()
    src = save_nifti(suv, aff, tmp_path / "in" / "s.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "s_denoised_qc.png").write_bytes(b"someone else's")
    err = input_error(run_in_process, dataset_dir=str(src), output_dir=str(out), **untrained())
    assert "s_denoised_qc.png already exists" in str(err)  # an existing QC file is an existing output
    assert sorted(p.name for p in out.iterdir()) == ["s_denoised_qc.png"]
    assert (out / "s_denoised_qc.png").read_bytes() == b"someone else's"
    (out / "s_denoised_qc.png").unlink()
    run_in_process(dataset_dir=str(src), output_dir=str(tmp_path / "plain"), **untrained(qc_report=False))
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["s_denoised.json", "s_denoised.nii.gz"]
    side = json.loads((tmp_path / "plain" / "s_denoised.json").read_text())
    assert side["input_suv_max"] == pytest.approx(12.0) and "timing_s" in side and "qc_report" not in side


def test_a_failing_qc_write_keeps_nothing_of_the_study(tmp_path, monkeypatch):
    suv, aff = body_with_foci()
    src = save_nifti(suv, aff, tmp_path / "in" / "s.nii.gz")
    out = tmp_path / "out"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qcmod, "render_png", disk_full)
    err = input_error(run_in_process, dataset_dir=str(src), output_dir=str(out), **untrained())
    assert "space" in str(err) and "\n" not in str(err)
    assert list(out.iterdir()) == [], "no NIfTI, sidecar, QC file, temporary or claim left"


def test_denoise_command_help_and_one_file(tmp_path):
    helped = run_python("-m", "scripts.denoise", "--help", timeout=60, OMP_NUM_THREADS="1")
    assert helped.returncode == 0 and "NIfTI file" in helped.stdout and "--output_format" in helped.stdout
    suv, aff = body_with_foci((36, 30, 26))
    src = save_nifti(suv, aff, tmp_path / "one.nii.gz")
    proc = run_python(
        "-m",
        "scripts.denoise",
        src,
        tmp_path / "out",
        "--checkpoint",
        "",
        "--allow_untrained",
        "true",
        "--progress",
        "false",
        *TINY_CLI,
        OMP_NUM_THREADS="1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "one_denoised.json",
        "one_denoised.nii.gz",
        "one_denoised_qc.json",
        "one_denoised_qc.png",
    ]
    y = np.asarray(nib.load(str(tmp_path / "out" / "one_denoised.nii.gz")).dataobj)
    np.testing.assert_allclose(y, suv, atol=1e-5)  # the untrained network is the identity
    missing = run_python(
        "-m", "scripts.denoise", tmp_path / "nope.nii.gz", tmp_path / "o2", timeout=60, OMP_NUM_THREADS="1"
    )
    assert (
        missing.returncode == 2 and missing.stderr.strip().startswith("error:") and "does not exist" in missing.stderr
    )
    assert not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_qc_report_on_the_real_series(tmp_path, real_pet_dir, caplog):
    """The real FDG series as one DICOM series folder (--dataset_dir is the series itself), a non-identity tiny
    network, and a hot-spot threshold of 0 % so that every changed focus is named in a WARNING line."""
    import matplotlib.image as mpimg
    from test_inference import perturbed_checkpoint

    net = dict(channels=2, num_blocks=1, latent_dim=4, san_channels=[2])
    ckpt = perturbed_checkpoint(tmp_path / "p.pt", **net)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        run_in_process(
            dataset_dir=str(real_pet_dir),
            output_dir=str(out),
            checkpoint=str(ckpt),
            **net,
            patch_size=[32, 32, 32],
            qc_max_hotspot_change_pct=0.0,
        )
    name = real_pet_dir.name
    report = json.loads((out / f"{name}_denoised_qc.json").read_text())
    source = read_pet_series(real_pet_dir)
    assert report["input_suv_max"] == pytest.approx(float(source.suv.max()), rel=1e-6)
    y = np.asarray(nib.load(str(out / f"{name}_denoised.nii.gz")).dataobj)
    assert report["output_suv_max"] == pytest.approx(float(y.max()), rel=1e-6)
    assert len(report["hotspots"]) == 5 and report["hotspots"][0]["before"]["suv_max"] == pytest.approx(
        report["input_suv_max"]
    )
    assert all(s["before"]["suv_peak"] <= s["before"]["suv_max"] for s in report["hotspots"])
    ref = report["reference_region"]
    assert 1.3 <= ref["before"]["suv_mean"] <= 3.5 and ref["before"]["cov_pct"] > 0
    named = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "hot spot" in r.getMessage()]
    in_json = [w for w in report["warnings"] if "hot spot" in w]
    assert len(named) == len(in_json) >= 1 and all(name in m and "SUVmax" in m for m in named)
    img = mpimg.imread(str(out / f"{name}_denoised_qc.png"))
    assert img.ndim == 3 and img.shape[0] > 400 and img.shape[1] > 600
    side = json.loads((out / f"{name}_denoised.json").read_text())
    assert side["input_suv_max"] == pytest.approx(report["input_suv_max"])
