"""Per-DRF evaluation of a UniPET checkpoint (``configs/evaluate.json``).

- :mod:`scripts.evaluation.split`: which pairs to evaluate (test split, validation fallback, or all).
- :mod:`scripts.evaluation.weights`: load the checkpoint (or warn loudly that the network is untrained).
- :mod:`scripts.evaluation.regions`: lesion/organ SUVmean and SUVmax bias from a label map.
- :mod:`scripts.evaluation.montage`: the per-subject PNG figure.
- :mod:`scripts.evaluation.display`: orientation from the affine, letters and scale bar for every figure
  (the montage, the demo and the inference QC report).
- :mod:`scripts.evaluation.report`: the Ignite handler that scores every item and writes ``eval/``.
"""
