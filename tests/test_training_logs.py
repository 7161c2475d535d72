"""Training logs a reader can trust (issue 16): log lines off the progress bar's line, labelled bars, per-DRF
validation PSNR and a validation image for TensorBoard. The TensorBoard keys of a whole tiny training run are
checked in tests/test_training.py (test_bundle_training_run_id_end_to_end), which already runs one."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from scripts.engines.log_handlers import PerDRFPSNR, ValidationImageSummary, drf_tag
from scripts.engines.progress import LossProgressBar
from scripts.metrics.image_quality import psnr


def _screen(text: str) -> list[str]:
    """What a terminal shows: lines split at newlines, each carriage return restarting (overwriting) its line."""
    rows = []
    for line in text.split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part) :]
        rows.append(shown.rstrip())
    return rows


def test_log_line_during_an_active_bar_starts_on_its_own_line():
    buf = io.StringIO()  # one "terminal" for the bar and the log handler
    log = logging.getLogger("unipet.test.progress")
    log.propagate = False
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("LOGLINE %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        engine = Engine(lambda e, b: {"loss": 0.5, "stage": 1})
        LossProgressBar(file=buf, mininterval=0).attach(engine)
        engine.add_event_handler(
            Events.ITERATION_COMPLETED(every=2), lambda e: log.info(f"iteration {e.state.iteration}")
        )
        engine.run([0] * 4, max_epochs=2)
        rows = _screen(buf.getvalue())
        logged = [r for r in rows if "LOGLINE" in r]
        assert len(logged) == 4, rows
        assert all(r.startswith("LOGLINE iteration") for r in logged), f"a log line was glued onto the bar: {logged}"
        # the bars say what they count, and the bar is redrawn after the log line
        assert any(r.startswith("train epoch 2/2 (iterations)") for r in rows), rows
        assert "emit" not in handler.__dict__, "the routing must be undone when the run completes"
    finally:
        log.removeHandler(handler)


def test_bar_label_for_a_single_pass_and_absent_keys():
    buf = io.StringIO()
    engine = Engine(lambda e, b: {"stage": 2})  # critic pre-training: no ``loss`` in the output
    LossProgressBar(keys=("loss", "stage"), label="evaluation", unit="volumes", file=buf, mininterval=0).attach(engine)
    engine.run([0] * 2, max_epochs=1)
    shown = _screen(buf.getvalue())
    assert any(r.startswith("evaluation (volumes)") for r in shown), shown
    assert not any("loss" in r for r in shown)


def _validation_engine(items):
    """An engine whose iterations look like a decollated SupervisedEvaluator's (batch and output lists)."""

    def step(engine, batch):
        return [{"image": b["image"], "label": b["label"], "pred": b["pred"]} for b in batch]

    return Engine(step), [[it] for it in items]


def test_per_drf_psnr_groups_items_by_their_drf():
    torch.manual_seed(0)
    label = torch.rand(1, 8, 8, 8)
    items = []
    for drf, noise in ((4, 0.01), (20, 0.1), (4, 0.02), (2.5, 0.05)):
        pred = label + noise * torch.randn_like(label)
        items.append({"image": pred, "label": label, "pred": pred, "drf": drf})
    engine, data = _validation_engine(items)
    PerDRFPSNR().attach(engine)
    engine.run(data, max_epochs=1)
    m = engine.state.metrics
    expect4 = np.mean([float(psnr(it["pred"][None], label[None], 1.0, 1.0)) for it in items if it["drf"] == 4])
    assert m["val_psnr_drf4"] == pytest.approx(expect4, rel=1e-6)
    assert m["val_psnr_drf20"] < m["val_psnr_drf4"]
    assert set(m) == {"val_psnr_drf4", "val_psnr_drf20", "val_psnr_drf2.5"}
    assert drf_tag("20") == drf_tag(20.0) == drf_tag(torch.tensor([20])) == "20"


def test_validation_image_is_radiological_superior_up():
    summary = ValidationImageSummary("unused", suv_max=20.0, axcodes="RAS")
    vol = np.zeros((6, 5, 4), dtype=np.float32)  # R, A, S axes
    vol[5, 2, 3] = 1.0  # patient's right-most, superior-most voxel
    sl, index = summary.coronal(vol, 2)
    assert index == 2 and sl.shape == (4, 6)  # rows: S->I, columns: R->L
    assert sl[0, 0] == 1.0, "patient's right must be on the viewer's left, superior at the top"
    lps = ValidationImageSummary("unused", axcodes="LPS")
    flipped = vol[::-1, ::-1, :]  # the same body stored L, P, S
    assert np.array_equal(lps.coronal(flipped, 5 - 1 - 2)[0], sl)
    with pytest.raises(ValueError, match="axcodes"):
        ValidationImageSummary("unused", axcodes="RAR")


def test_validation_image_written_once_per_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    label = torch.zeros(1, 8, 6, 4)
    label[0, 2, 3, 1] = 0.5
    items = [{"image": label * 0.9, "label": label, "pred": label * 0.95, "drf": 4}] * 2
    engine, data = _validation_engine(items)
    ValidationImageSummary(str(tmp_path), suv_max=20.0, suv_window=(0.0, 7.0)).attach(engine)
    engine.run(data, max_epochs=1)
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("val_slice_low_output_full")
    assert len(images) == 1 and images[0].width == 3 * 8 + 2 and images[0].height == 4


def test_per_drf_psnr_without_decollation():
    # decollate=False engines give one dict of (B, ...) tensors and a collated DRF tensor
    torch.manual_seed(1)
    label = torch.rand(2, 1, 6, 6, 6)
    pred = label + torch.tensor([0.01, 0.1]).reshape(2, 1, 1, 1, 1) * torch.randn_like(label)
    batch = {"image": pred, "label": label, "pred": pred, "drf": torch.tensor([4.0, 50.0])}
    engine = Engine(lambda e, b: {"image": b["image"], "label": b["label"], "pred": b["pred"]})
    PerDRFPSNR().attach(engine)
    engine.run([batch], max_epochs=1)
    expect = psnr(pred, label, 1.0, 1.0)
    assert engine.state.metrics["val_psnr_drf4"] == pytest.approx(float(expect[0]), rel=1e-6)
    assert engine.state.metrics["val_psnr_drf50"] == pytest.approx(float(expect[1]), rel=1e-6)


def test_per_drf_psnr_items_without_a_drf_log_once_and_invent_nothing(caplog):
    label = torch.rand(1, 6, 6, 6)
    engine, data = _validation_engine([{"image": label, "label": label, "pred": label * 0.9}] * 2)
    PerDRFPSNR().attach(engine)
    with caplog.at_level(logging.WARNING):
        engine.run(data, max_epochs=1)
    assert not [k for k in engine.state.metrics if k.startswith("val_psnr_drf")]
    assert sum("no per-DRF PSNR" in r.getMessage() for r in caplog.records) == 1
