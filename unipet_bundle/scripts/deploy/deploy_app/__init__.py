"""MONAI Deploy App SDK application: a folder of DICOM studies in, a denoised derived PET series per PET series out.

Operators, in flow order (``app.py`` wires them)::

    DICOMDataLoaderOperator (SDK)  ->  DICOMSeriesSelectorOperator (SDK, Modality PT, every match)
      ->  PETSeriesToSUVOperator (ours)  ->  UniPETInferenceOperator (ours: the bundle's inference)
      ->  DerivedPETSeriesWriterOperator (ours: float-safe derived PET series)

Why three operators are ours and not the SDK's (App SDK 4.0):

- the SDK's ``DICOMSeriesToVolumeOperator`` picks one dtype for the whole volume from the *first* slice
  (an empty end slice is "safely" int16), then stores every later slice in that dtype: per-slice PET
  rescale slopes are truncated to integers. Ours reads each slice with its own slope in float64 and
  computes SUV from the series' tags (:func:`scripts.data.suv.read_pet_series`);
- the SDK's ``MonaiBundleInferenceOperator`` casts every "image" output to uint8, and its loader filter
  keeps our ``LoadPETd`` (it only drops ``LoadImage*``); ours runs the bundle's ``inference.json``
  components on the in-memory volume (:class:`scripts.inference.denoise.BundleDenoiser`) and
  passes float32 on;
- the SDK ships no image-series writer; ours is :func:`scripts.inference.dicom_writer.write_derived_pet_series`
  (int16 with a per-slice RescaleSlope from each slice's own peak, SUV tags kept), and every written
  series is read back and compared with the float volume before the run counts as done.

Everything that does not need the SDK lives in :mod:`.pet_series` (plain functions, tested without the
SDK). :mod:`.operators` and :mod:`.app` import the SDK and are only imported when the app runs.
"""
