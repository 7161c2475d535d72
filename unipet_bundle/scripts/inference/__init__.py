"""Whole-volume inference (``configs/inference.json``): denoise every input of a folder, on its own grid.

Usage (from the bundle root)::

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT \\
        [--output_format nifti|dicom|both] [--checkpoint models/model.pt] [--overwrite true] [--resample false]

The flow, per input (``IN/*.nii``, ``IN/*.nii.gz`` in SUV, and ``IN/<folder>/`` PET DICOM series; ``IN`` may
also be one NIfTI file or one series folder, and ``python -m scripts.denoise IN OUT`` runs this config):

1. every input and every output path is checked first (:func:`.inputs.prepare_datalist`): a bad input
   stops the run with one ``error: ...`` line (exit status 2) before anything is written;
2. load into SUV (a DICOM series in Bq/mL is converted with its own SUV factor) as (X, Y, Z) in the
   input's storage order, then reorient (flips/transposes, exact) to ``network_axcodes`` (``RAS``), the
   orientation training uses, so the output does not depend on how the input stores its axes;
3. resample to the training voxel size (``target_spacing``, 4 mm by default) when the input's differs
   (``resample``, on by default); bilinear, so small hot spots lose some of their peak in the round trip;
4. divide by ``suv_max`` (20) *without clipping*: hot spots above 20 SUV (a 66 SUV bladder) pass
   through the network's global skip and keep their value, and negative voxels, which PET
   reconstructions legitimately contain, are kept as they are;
5. UniPET on windows of the training patch size (the SAN pools over the whole window), batched
   (``sw_batch_size``) and blended with a Gaussian; the stitched volume stays on the CPU;
6. take the correction (prediction - network input) x ``suv_max`` on the network grid, resample it in
   float32 to the input grid and add it in place to the native SUV through a view that undoes the
   reorientation (:mod:`.residual`; memory: about one native volume), and write
   ``OUT/<name>_denoised.nii.gz`` (SUV) with ``<name>_denoised.json`` (units, SUV factor, model, grids),
   and, with ``output_format`` dicom/both, ``OUT/<name>_denoised_dicom/`` for DICOM inputs (Bq/mL), and
   with ``qc_report`` (default) the QC report ``OUT/<name>_denoised_qc.png`` / ``_qc.json`` (:mod:`.qc`).

A ``--checkpoint`` that does not exist is an error; the untrained UniPET (the identity) runs only when asked
(``--checkpoint "" --allow_untrained true``) and its outputs say UNTRAINED. Runs sharing ``output_dir`` never
remove each other's outputs (:mod:`.claims`).

Modules (each has one job): :mod:`.inputs` (discover, validate, load), :mod:`.model` (weights),
:mod:`.writer` (outputs), :mod:`.dicom_writer` (derived PET series), :mod:`.claims` (who may write an
input's outputs), :mod:`.report` (log lines), :mod:`.residual` (the correction back on the native grid),
:mod:`.memory` (one study in memory at a time), :mod:`.qc` (the per-study QC report), :mod:`.denoise`
(inference.json's components on a volume held in memory: the Deploy app, MONAI Label, the demo and the
quality benchmark denoise through it). Option values and one-line errors are on
the common floor (:mod:`scripts.common.options`, :mod:`scripts.common.errors`); see ``docs/code_map.md``.
"""
