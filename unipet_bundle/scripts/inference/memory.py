"""Keep a whole-body study in about its own memory, and a folder of many studies in the memory of one.

- :func:`collate_native_by_reference`: the data loader must not copy the native volume;
- :class:`ReleaseStudyData`: Ignite keeps ``engine.state.output`` (here the denoised native volume) until
  the *next* study has been loaded, so without it two whole-body studies would be held at every change.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import list_data_collate

__all__ = ["ReleaseStudyData", "collate_native_by_reference"]

NATIVE_KEYS = ("native_suv",)
# carried to the writer as they are, one per study (a DICOM input's headers: scripts.inference.dicom_writer.SourceSeries)
BY_REFERENCE_KEYS = ("source_series",)


def collate_native_by_reference(batch: Sequence[Mapping[Hashable, Any]]) -> dict[Hashable, Any]:
    """MONAI's ``list_data_collate``, except that a batch of one study keeps its native volume as a view.

    The default collation stacks every tensor into a new batch tensor: for the native SUV of a whole-body
    study that is a 0.5 GB copy (and a C-ordered one, which makes the NIfTI writer's Fortran-order output
    slow). With ``batch_size`` 1 (inference.json) ``native_suv`` gets a batch axis as a view instead;
    larger batches are collated as usual. :data:`BY_REFERENCE_KEYS` (a DICOM input's source headers, which
    collation cannot stack) become a list with one entry per study, for any batch size.
    """
    items = [dict(item) for item in batch]
    carried = {k: [item.pop(k, None) for item in items] for k in BY_REFERENCE_KEYS if any(k in item for item in items)}
    if len(items) != 1:
        out = list_data_collate(items)
        out.update(carried)
        return out
    item = items[0]
    native = {k: item.pop(k) for k in NATIVE_KEYS if k in item}
    out = list_data_collate([item])
    for key, value in native.items():
        out[key] = torch.as_tensor(value).unsqueeze(0)
    out.update(carried)
    return out


class ReleaseStudyData:
    """At the end of each iteration, after the writer and the report handlers, forget the batch and output.

    Attach it as the *last* handler of the evaluator (handlers run in the order they were attached).
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.batch = None
        engine.state.output = None
