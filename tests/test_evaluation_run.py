"""An evaluation run (configs/evaluate.json, issue 16): no "best metric" lines, the dataset folder's datalist.json
is used, and the log names the subjects and DRFs evaluated."""

from __future__ import annotations

import logging

from test_training import TINY, bundle_run, make_pairs

from scripts.data.datalist import write_datalist
from scripts.evaluation.split import evaluation_datalist

EVAL_CONFIG = "['configs/train.json','configs/evaluate.json']"


def test_the_datalist_in_the_dataset_folder_is_used_and_the_log_names_subjects_and_drfs(tmp_path, caplog):
    data = make_pairs(tmp_path / "pairs", n_subjects=4, shape=(12, 12, 12))
    datalist = write_datalist(data, data / "datalist.json", val_fraction=0.25, test_fraction=0.25, seed=3)
    import json

    test_subjects = sorted({e["subject"] for e in json.loads(datalist.read_text())["test"]})
    with caplog.at_level(logging.INFO):
        entries = evaluation_datalist(data, "test")
    assert sorted({e["subject"] for e in entries}) == test_subjects and {e["split"] for e in entries} == {"test"}
    assert "found in the dataset folder" in caplog.text
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluating "))
    assert all(s in line for s in test_subjects) and "DRFs 4, 20" in line and "test split" in line


def test_an_evaluation_run_prints_no_best_metric_lines(tmp_path):
    data = make_pairs(tmp_path / "pairs", n_subjects=2, shape=(16, 16, 16))
    proc = bundle_run(
        [
            "--config_file",
            EVAL_CONFIG,
            "--dataset_dir",
            str(data),
            "--ckpt_dir",
            str(tmp_path / "ckpt"),
            "--checkpoint",
            "",
            "--allow_untrained",
            "true",
            "--output_dir",
            str(tmp_path / "out"),
            "--eval_split",
            "all",
            "--write_montages",
            "false",
            *TINY,
        ]
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "best metric" not in log.lower() and "best value" not in log.lower(), log[-3000:]
    assert "evaluating 4 pairs: 2 subjects (sub0, sub1)" in log and "DRFs 4, 20" in log
    assert (tmp_path / "out" / "eval" / "summary.json").is_file()
