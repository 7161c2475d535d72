"""The quality benchmark (scripts.benchmarks.quality) and the training driver (scripts.benchmarks.train_models)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BUNDLE_ROOT, run_python
from scripts.benchmarks import quality, train_models
from scripts.common.errors import UniPETInputError
from scripts.data import simulate as sim
from scripts.inference.denoise import network_from_config
from scripts.networks.plain_unet import ResidualUNet

FAST = dict(n_angles=64, n_subsets=8, n_iterations=3)


def _perturbed_default_net(path: Path, seed: int) -> Path:
    """A state_dict of the default-size UniPET that is not the identity."""
    torch.manual_seed(seed)
    net, _ = network_from_config(BUNDLE_ROOT / "configs" / "train.json", BUNDLE_ROOT)
    with torch.no_grad():
        net.output_conv.weight.normal_(0.0, 0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("quality") / "work"
    data = work / "sim"
    for i in range(2):
        sim.simulate_subject(data, f"phantom_{i:03d}", shape=(32, 32, 24), drfs=[4, 20, 30], seed=i, **FAST)
    sim.simulate_subject(
        data, "real_x", activity=data / "phantom_001" / "activity.nii.gz", drfs=[4, 20, 30], seed=5, **FAST
    )

    def entries(subject):
        return [
            {"image": f"{subject}/drf_{d}.nii.gz", "label": f"{subject}/full_dose.nii.gz", "drf": d, "subject": subject}
            for d in (4, 20)
        ]

    (data / "datalist.json").write_text(
        json.dumps(
            {"training": [], "validation": entries("phantom_000"), "test": entries("phantom_001") + entries("real_x")}
        )
    )
    unseen = work / "sim_unseen"
    for i in range(2):  # a tiny unseen family: other reconstruction, DRFs 7 and 150
        sim.simulate_subject(
            unseen,
            f"phantom_{i:03d}",
            shape=(32, 32, 24),
            drfs=[7, 150],
            seed=10 + i,
            n_angles=64,
            n_subsets=8,
            n_iterations=8,
            postfilter_fwhm_mm=10.0,
            phantom_options={
                "lesion_contrast": (2.0, 15.0),
                "lesion_partial_volume": True,
                "n_lesions": (4, 4),
                "lesion_hosts": {"liver": 1, "lungs": 1},
            },
        )
    (unseen / "family.json").write_text(json.dumps({"validation": ["phantom_000"], "test": ["phantom_001"]}))
    for seed, rel in enumerate(
        [
            "vanilla/model_stage1.pt",
            "drf_4/model_stage1.pt",
            "drf_20/model_stage1.pt",
            "san_only/model.pt",
            "rals_only/model.pt",
            "drf_10/model_stage1.pt",
            "drf_100/model_stage1.pt",
            "no_regional/model.pt",
        ]
    ):
        _perturbed_default_net(work / "models" / rel, seed)
    # the plain MONAI UNet baseline: its own network class (no no_hotspot run: optional models are skipped)
    torch.manual_seed(3)
    (work / "models" / "unet").mkdir(parents=True)
    torch.save(ResidualUNet().state_dict(), work / "models" / "unet" / "model_stage1.pt")
    _perturbed_default_net(work / "unipet.pt", 9)
    return work


def test_quality_benchmark_end_to_end(work):
    result = quality.run(
        str(work), checkpoint=str(work / "unipet.pt"), update_docs=False, families="[in_family,unseen_recon]"
    )
    out = work / "quality"
    for name in (
        "quality.json",
        "cases.csv",
        "regions.csv",
        "quality.md",
        "quality.png",
        "texture_in_family.png",
        "texture_unseen_recon.png",
        "rc_in_family_drf_20.png",
        "rc_unseen_recon_drf_150.png",
    ):
        assert (out / name).is_file(), name
    fam = result["families"]["in_family"]
    assert fam["test_subjects"] == ["phantom_001", "real_x"]
    assert set(fam["gaussian"]) == {"4", "20", "30"} and fam["unseen_drfs"] == ["30"]
    # a heavier DRF never wants a narrower optimal filter on the same subject
    assert fam["gaussian"]["4"]["fwhm_mm"] <= fam["gaussian"]["30"]["fwhm_mm"]
    s = fam["summary"]
    assert set(s) == {
        "input",
        "gaussian",
        "unipet",
        "unet",
        "vanilla",
        "drf_specific",
        "san_only",
        "rals_only",
        "no_regional",
    }
    for m in s:
        for d in ("4", "20", "30"):
            assert s[m][d]["subjects"] == 2 and math.isfinite(s[m][d]["psnr"]) and math.isfinite(s[m][d]["psnr_refmax"])
    # the tuned filter beats the raw input at a high DRF (it was tuned on another subject)
    assert s["gaussian"]["30"]["psnr"] > s["input"]["30"]["psnr"]
    # lesions come from the phantom only; the real-series subject has none, and is reported on its own
    assert s["unipet"]["20"]["lesions"] > 0 and s["unipet"]["20"]["lesions_all"]["n"] == s["unipet"]["20"]["lesions"]
    assert s["unipet"]["20"]["liver"]["n"] == 1 and s["input"]["20"]["liver"]["mean_cov_pct"] > 0
    assert fam["real_subject"]["subject"] == "real_x"
    beaten = fam["baselines_beaten"]["20"]
    assert sorted(beaten["beaten_on_psnr"] + beaten["not_beaten_on_psnr"]) == sorted(
        set(quality.BASELINES) - {"no_hotspot", "with_align"}  # optional models without a checkpoint here
    )
    unseen = result["families"]["unseen_recon"]
    assert unseen["drfs"] == ["7", "150"] and unseen["unseen_drfs"] == ["7", "150"]
    assert unseen["summary"]["unipet"]["150"]["lesions"] == 4
    rows = (out / "cases.csv").read_text().splitlines()
    assert len(rows) == 1 + 9 * (2 * 3 + 1 * 2)
    # per DRF: Gaussian margin, texture, lesions, liver, vanilla, DRF-specific, plain UNet
    assert len(fam["targets"]) == 3 * 7
    table = (out / "quality.md").read_text()
    assert "simulated data" in table and "| 30 | DRF-specific * |" in table and "targets on this family" in table
    assert "| 20 | plain MONAI UNet (residual, L1) |" in table and "ahead of the plain MONAI UNet" in table
    assert "PSNR dB (UDPET, ref max)" in table and "does **not** beat" in table
    assert "sha256" not in table and result["provenance"]["checkpoints_sha256"]
    # metadata.json's eval_metrics come from the same result (update_docs writes them)
    metrics = quality.eval_metrics(result)
    assert metrics["in_family_drf20_unipet_psnr"] == round(s["unipet"]["20"]["psnr"], 2)
    assert metrics["unseen_recon_drf150_gaussian_psnr"] == round(unseen["summary"]["gaussian"]["150"]["psnr"], 2)
    assert metrics["in_family_drf30_vanilla_psnr"] == round(s["vanilla"]["30"]["psnr"], 2)
    meta = work / "metadata.json"
    meta.write_text((BUNDLE_ROOT / "configs" / "metadata.json").read_text())
    quality.update_eval_metrics(meta, result)
    written = json.loads(meta.read_text())
    assert written["eval_metrics"] == json.loads(json.dumps(metrics))
    assert written["version"] == json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())["version"]


def test_quality_benchmark_denoises_with_the_bundle_inference(work, tmp_path):
    """Issue 17, one inference path: each benchmarked network runs configs/inference.json's own pipeline, so a test
    volume comes out exactly as inference.json writes it with the same weights (on the volume's own grid: the
    benchmark does not resample). The volumes (24 slices) are thinner than a window: inference.json's padding."""
    import shutil

    from conftest import run_inference_in_process
    from scripts.data.io import load_nifti

    net, settings = network_from_config(BUNDLE_ROOT / "configs" / "train.json", BUNDLE_ROOT)
    net.load_state_dict(torch.load(work / "unipet.pt", weights_only=True))
    low, affine = load_nifti(work / "sim" / "phantom_001" / "drf_20.nii.gz")
    den = quality._denoiser(net, ("unipet", None), settings)(low, affine)
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(work / "sim" / "phantom_001" / "drf_20.nii.gz", src / "low.nii.gz")
    run_inference_in_process(
        dataset_dir=str(src),
        output_dir=str(tmp_path / "out"),
        checkpoint=str(work / "unipet.pt"),
        resample=False,
        qc_report=False,
        device="cpu",
    )
    bundle_den = load_nifti(tmp_path / "out" / "low_denoised.nii.gz")[0]
    np.testing.assert_array_equal(den, bundle_den)
    inference = quality._inference_settings(quality._denoiser(net, ("unipet", None), settings))
    assert inference["inference_config"] == "configs/inference.json" and inference["resample"] is False
    assert inference["padding_mode"] == "replicate" and inference["patch_size"] == [32, 32, 32]


def test_quality_benchmark_scores_a_subset_of_models(work, tmp_path):
    result = quality.run(
        str(work),
        checkpoint=str(work / "unipet.pt"),
        update_docs=False,
        families="unseen_recon",
        models="unipet",
        out_dir=str(tmp_path / "q"),
        drfs="[7,150]",
    )
    s = result["families"]["unseen_recon"]["summary"]
    assert set(s) == {"input", "gaussian", "unipet"}
    assert len(result["families"]["unseen_recon"]["targets"]) == 2 * 4  # no vanilla / DRF-specific rows
    # the recorded command (model card, metadata eval_metrics) names every argument that changed the table
    cmd = result["command"]
    for part in (
        f"--checkpoint {work / 'unipet.pt'}",
        '--families "[unseen_recon]"',
        "--models unipet",
        '--drfs "[7,150]"',
    ):
        assert part in cmd, (part, cmd)


def test_drf_given_upper_bound_is_run_at_each_volumes_own_drf(work, tmp_path):
    """The DRF-conditioned models are one network each, run through the bundle inference at each test volume's true
    DRF (also an unseen one), and judged by the shipped model's targets; the label-free styled model runs as it is."""
    from scripts.networks.drf_conditioned import DRFConditionedUniPET, NoiseConditionedUniPET, ThinningBlendUniPET

    own = tmp_path / "w"
    own.mkdir()
    (own / "sim_unseen").symlink_to(work / "sim_unseen", target_is_directory=True)
    template, _ = network_from_config(BUNDLE_ROOT / "configs" / "train.json", BUNDLE_ROOT)
    torch.manual_seed(4)
    film = DRFConditionedUniPET(**template.init_kwargs)
    with torch.no_grad():
        film.output_conv.weight.normal_(0.0, 0.02)
        for block in film.blocks:
            block.style_affine.weight.normal_(0.0, 0.05)
    (own / "models" / "film").mkdir(parents=True)
    torch.save(film.state_dict(), own / "models" / "film" / "model.pt")
    seen: list[float] = []
    noise = NoiseConditionedUniPET(**template.init_kwargs)  # label-free: the plain inference path
    (own / "models" / "noise_styles").mkdir(parents=True)
    torch.save(noise.state_dict(), own / "models" / "noise_styles" / "model.pt")
    blend = ThinningBlendUniPET(**template.init_kwargs)  # UniPET's own state dict, SAN included
    blend.load_state_dict(film.state_dict(), strict=False)
    (own / "models" / "thinning_blend").mkdir(parents=True)
    torch.save(blend.state_dict(), own / "models" / "thinning_blend" / "model.pt")
    forwards = {cls: cls.forward for cls in (DRFConditionedUniPET, ThinningBlendUniPET)}

    def recorder(cls):
        def record(self, x, drf=None):
            seen.append((cls.__name__, float(drf.flatten()[0])))
            return forwards[cls](self, x, drf)

        return record

    with pytest.MonkeyPatch.context() as mp:
        for cls in forwards:
            mp.setattr(cls, "forward", recorder(cls))
        result = quality.run(
            str(own),
            checkpoint=str(work / "unipet.pt"),
            update_docs=False,
            families="unseen_recon",
            models="unipet,film,noise_styles,thinning_blend",
            out_dir=str(tmp_path / "q"),
            drfs="[7,150]",
        )
    # the exact DRFs, not the nearest trained one
    assert set(seen) == {(c.__name__, d) for c in forwards for d in (7.0, 150.0)}
    fam = result["families"]["unseen_recon"]
    assert set(fam["summary"]) == {"input", "gaussian", "unipet", "film", "noise_styles", "thinning_blend"}
    assert set(fam["targets_by_model"]) == {"film", "thinning_blend"}
    checks = fam["targets_by_model"]["film"]
    assert [c["target"] for c in checks] == [c["target"] for c in fam["targets"]]
    gain = fam["summary"]["film"]["7"]["psnr"] - fam["summary"]["input"]["7"]["psnr"]
    assert checks[0]["value"].startswith(f"{gain:+.2f} dB vs input")  # judged on film's numbers, not UniPET's
    assert "upper bound: DRF given (FiLM)" in (tmp_path / "q" / "quality.md").read_text()


def _summary(
    unipet: float, specific: float, vanilla: float, tex_u: float, bias: float, bias_g: float, liver: float
) -> dict:
    def e(psnr, tex=1.0, b=None, lv=None):
        return {
            "psnr": psnr,
            "texture_ratio": tex,
            "mean_lesion_suvmax_bias_pct": b,
            "liver": {"max_abs_suvmean_bias_pct": lv, "mean_suvmean_bias_pct": lv} if lv is not None else None,
        }

    return {
        "input": {"20": e(30.0)},
        "gaussian": {"20": e(32.0, b=bias_g)},
        "unipet": {"20": e(unipet, tex_u, bias, liver)},
        "drf_specific": {"20": e(specific)},
        "vanilla": {"20": e(vanilla)},
    }


@pytest.mark.parametrize(
    "args, met",
    [
        ((34.0, 34.1, 33.9, 0.9, -5.0, -8.0, 2.0), [True, True, True, True, True, True]),
        # < 1 dB over the Gaussian, over-smoothed, lesions -12 %, liver 6 % off, 0.1 dB under vanilla, 0.5 under DRF-specific
        ((32.5, 33.0, 32.6, 0.7, -12.0, -8.0, 6.0), [False, False, False, False, False, False]),
        # lesion bias within 10 % but worse than the Gaussian's: not met
        ((33.5, 33.8, 33.5, 1.15, -9.0, -4.0, 5.0), [True, True, False, True, True, True]),
    ],
)
def test_targets_are_judged_from_the_numbers(args, met):
    checks = quality.check_targets(_summary(*args), ["20"])
    assert [c["met"] for c in checks] == met, checks


def test_model_card_table_is_replaced_between_markers_only(tmp_path):
    docs = tmp_path / "README.md"
    docs.write_text(f"# card\nbefore\n{quality.TABLE_BEGIN}\nold table\n{quality.TABLE_END}\nafter\n")
    quality.update_model_card(docs, "| new |\n")
    assert docs.read_text() == f"# card\nbefore\n{quality.TABLE_BEGIN}\n| new |\n{quality.TABLE_END}\nafter\n"
    docs.write_text("no markers")
    with pytest.raises(UniPETInputError, match="markers"):
        quality.update_model_card(docs, "x")
    assert docs.read_text() == "no markers"
    shipped = (BUNDLE_ROOT / "docs" / "README.md").read_text()
    assert shipped.count(quality.TABLE_BEGIN) == 1 and shipped.count(quality.TABLE_END) == 1


def test_missing_model_is_a_clear_error(tmp_path, work):
    bare = tmp_path / "w"
    (bare / "sim").mkdir(parents=True)
    (bare / "sim" / "datalist.json").write_text((work / "sim" / "datalist.json").read_text())
    with pytest.raises(UniPETInputError, match="train it with `python -m scripts.benchmarks.train_models`"):
        quality.run(
            str(bare), checkpoint=str(work / "unipet.pt"), update_docs=False, families="in_family", drfs="[4,20]"
        )
    with pytest.raises(UniPETInputError, match="phantom_001 is missing or not simulated"):
        quality.run(str(bare), checkpoint=str(work / "unipet.pt"), update_docs=False, families="in_family")
    with pytest.raises(
        UniPETInputError, match="family.json not found: run `python -m scripts.benchmarks.train_models unseen_family"
    ):
        quality.run(str(bare), checkpoint=str(work / "unipet.pt"), update_docs=False)
    with pytest.raises(UniPETInputError, match="must include unipet"):
        quality.run(str(work), checkpoint=str(work / "unipet.pt"), update_docs=False, models="vanilla")


def test_trials_are_scored_on_validation_subjects_without_touching_a_test_subject(work, tmp_path):
    """--score_on validation: the first half of each family's validation subjects tunes the Gaussian, the second
    half is scored; the docs are never written; one validation subject is a clear error."""
    with pytest.raises(UniPETInputError, match="--score_on must be test or validation"):
        quality.run(str(work), checkpoint=str(work / "unipet.pt"), update_docs=False, score_on="train")
    with pytest.raises(UniPETInputError, match="in_family has 1 validation subject"):
        quality.run(str(work), checkpoint=str(work / "unipet.pt"), update_docs=False, score_on="validation")
    two = tmp_path / "work"  # the fixture's folders, with two validation subjects in-family
    (two / "sim").mkdir(parents=True)
    for sub in (work / "sim").iterdir():
        if sub.is_dir():
            (two / "sim" / sub.name).symlink_to(sub)
    listed = json.loads((work / "sim" / "datalist.json").read_text())
    listed["validation"] += [e for e in listed["test"] if e["subject"] == "phantom_001"]
    (two / "sim" / "datalist.json").write_text(json.dumps(listed))
    result = quality.run(
        str(two),
        checkpoint=str(work / "unipet.pt"),
        families="in_family",
        models="unipet",
        drfs="[20]",
        out_dir=str(tmp_path / "q"),
        score_on="validation",  # update_docs stays at its default: refused for validation scores
    )
    fam = result["families"]["in_family"]
    assert fam["test_subjects"] == ["phantom_001"] and result["scored_on"] == "validation"
    assert "--score_on validation" in result["command"]
    text = (tmp_path / "q" / "quality.md").read_text()
    assert "1 validation subjects (phantom_001)" in text and "no test subject was used" in text


def test_train_models_commands(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train_models, "_run", lambda cmd, threads: calls.append((cmd, threads)))
    tm = train_models.TrainModels(str(tmp_path / "w"), threads=1)
    with pytest.raises(UniPETInputError, match="run the `data` step first"):
        tm.with_align()
    (tmp_path / "w" / "sim").mkdir(parents=True)
    tm.datalist.write_text("{}")
    tm.with_align()  # the branch point: 0.4.0's recipe, its L_align weight pinned in the command
    cmd, threads = calls[-1]
    assert cmd[1:5] == ["-m", "monai.bundle", "run", "--config_file"] and threads == 1
    assert cmd[cmd.index("--ckpt_dir") + 1].endswith("models/with_align")
    assert cmd[cmd.index("--align_weight") + 1] == "0.2"
    with pytest.raises(UniPETInputError, match="run the `with_align` step first"):
        tm.branch("vanilla")
    snap = tm.models / "with_align" / train_models.SNAPSHOT
    snap.parent.mkdir(parents=True)
    snap.write_bytes(b"x")
    tm.branch("rals_only")
    cmd = calls[-1][0]
    assert cmd[cmd.index("--init_checkpoint") + 1] == str(snap)
    overrides = ["--train_san", "false", "--align_weight", "0"]
    at = cmd.index("--train_san")
    assert cmd[at : at + 4] == overrides  # then the overrides that keep a pre-0.5.3 run what it was
    tm.branch("unipet")  # the shipped UniPET: same stage 1, stage 2 without L_align
    cmd = calls[-1][0]
    assert cmd[cmd.index("--ckpt_dir") + 1].endswith("models/unipet")
    assert cmd[cmd.index("--align_weight") + 1] == "0" and cmd[cmd.index("--init_checkpoint") + 1] == str(snap)
    # the DRF-given upper bound: the snapshot's weights (its SAN left out), stage 2 alone for the branches' length
    tm.branch("film_focus")
    cmd = calls[-1][0]
    assert cmd[cmd.index("--bdn_ckpt") + 1] == str(snap) and "--init_checkpoint" not in cmd
    assert cmd[cmd.index("--stage1_epochs") + 1] == "0"
    assert int(cmd[cmd.index("--epochs") + 1]) == train_models.EPOCHS - train_models.STAGE1_EPOCHS
    assert "DRFConditionedUniPET" in cmd[cmd.index("--network_def") + 1]
    assert cmd[cmd.index("--regional_drf_exponent") + 1] == "1.0" and cmd[cmd.index("--dose_balance") + 1] == "0.5"
    assert "--level_lock_fwhm_mm" not in cmd  # a new run: selected on the locked validation
    tm.branch("noise_styles")  # label-free: the window-statistics encoder, the shipped recipe
    cmd = calls[-1][0]
    assert cmd[cmd.index("--bdn_ckpt") + 1] == str(snap) and "--init_checkpoint" not in cmd
    assert cmd[cmd.index("--network_def") + 1].startswith("{'_target_': 'scripts.networks.drf_conditioned.Noise")
    # the thinning blend: UniPET's own parameters, so it resumes the snapshot's training state like dose_balanced_s2
    tm.branch("thinning_blend")
    cmd = calls[-1][0]
    assert cmd[cmd.index("--init_checkpoint") + 1] == str(snap) and "--bdn_ckpt" not in cmd
    target = cmd[cmd.index("--network_def#_target_") + 1]  # only the class changes, not the config's arguments
    assert "--network_def" not in cmd and cmd[cmd.index("--dose_balance") + 1] == "0.5"
    assert "--level_lock_fwhm_mm" not in cmd
    from monai.bundle import ConfigParser

    from scripts.networks.drf_conditioned import ThinningBlendUniPET

    parser = ConfigParser()  # the override builds in train.json, with the train.json network's settings
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    default_kwargs = parser.get_parsed_content("network_def").init_kwargs
    parser["network_def#_target_"] = target  # as monai.bundle run applies the override
    built = parser.get_parsed_content("network_def")
    assert isinstance(built, ThinningBlendUniPET) and built.init_kwargs == default_kwargs
    assert parser.get_parsed_content("network_takes_drf") is True
    tm.drf_specific([20])
    cmd = calls[-1][0]
    assert cmd[cmd.index("--drfs") + 1] == "[20]" and cmd[cmd.index("--stage1_epochs") + 1] == "23"
    with pytest.raises(UniPETInputError, match="unknown branch"):
        tm.branch("nope")
    tm.finetune("identity")  # a short trial from the shipped weights, the shipped stage-2 recipe as it is now
    cmd = calls[-1][0]
    assert cmd[cmd.index("--bdn_ckpt") + 1] == str(BUNDLE_ROOT / "models" / "model.pt")
    assert cmd[cmd.index("--ckpt_dir") + 1].endswith("models/finetune_identity")
    assert cmd[cmd.index("--stage1_epochs") + 1] == "0" and cmd[cmd.index("--epochs") + 1] == "4"
    assert cmd[cmd.index("--identity_fraction") + 1] == "0.15" and cmd[cmd.index("--stage2_dose_balance") + 1] == "0.5"
    assert "--level_lock_fwhm_mm" not in cmd and "--init_checkpoint" not in cmd
    with pytest.raises(UniPETInputError, match="unknown finetune run"):
        tm.finetune("nope")
    tm.branch("identity_pairs")  # the full branch of that trial: the shipped recipe plus identity pairs
    cmd = calls[-1][0]
    assert cmd[cmd.index("--init_checkpoint") + 1] == str(snap) and cmd[cmd.index("--identity_fraction") + 1] == "0.15"
    assert cmd[cmd.index("--dose_balance") + 1] == "0.5" and "--level_lock_fwhm_mm" not in cmd
    # the snapshot name follows the default config's stage-1 length
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    assert train_models.SNAPSHOT == f"checkpoint_iter{parser.get_parsed_content('stage1_iterations'):06d}.pt"


def test_ship_copies_weights_and_records_their_hash(tmp_path, monkeypatch):
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    monkeypatch.setattr(train_models, "BUNDLE_ROOT", root)
    tm = train_models.TrainModels(str(tmp_path / "w"))
    with pytest.raises(UniPETInputError, match="run the `dose_balanced_s2` step to the end first"):
        tm.ship()  # the default since 0.5.2: UniPET with a dose-balanced stage 2
    src = _perturbed_default_net(tm.models / "dose_balanced_s2" / "model.pt", 0)
    tm.ship()
    from scripts.common.large_files import recorded_sha256
    from scripts.common.weights import file_sha256

    assert (root / "models" / "model.pt").read_bytes() == src.read_bytes()
    assert recorded_sha256(root / "models" / "model.pt", root) == file_sha256(src)
    with pytest.raises(UniPETInputError, match="already exists"):
        tm.ship()


@pytest.mark.parametrize("module", ["scripts.benchmarks.quality", "scripts.benchmarks.train_models"])
def test_help(module):
    proc = run_python("-m", module, "--help", timeout=120, env={"PAGER": "cat", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "work_dir" in (proc.stdout + proc.stderr).lower().replace("-", "_")


def test_train_models_data_step_makes_both_families(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train_models, "_run", lambda cmd, threads: calls.append(cmd))
    monkeypatch.setattr(train_models, "_run_parallel", lambda cmds, threads: calls.append(cmds))
    tm = train_models.TrainModels(str(tmp_path / "w"))
    tm.data(n_phantoms=6, n_val=2, n_test=3, real="false", n_unseen=5, n_unseen_val=2)
    sim_cmds, datalist_cmd, unseen_cmd = calls
    assert all(c[c.index("--profile") + 1] == "randomised" for c in sim_cmds)
    assert [c[c.index("--n_subjects") + 1] for c in sim_cmds] == ["3", "6"]  # two processes by default
    assert datalist_cmd[datalist_cmd.index("--val_subjects") + 1] == "[phantom_001,phantom_002]"
    assert datalist_cmd[datalist_cmd.index("--test_subjects") + 1] == "[phantom_003,phantom_004,phantom_005]"
    assert unseen_cmd[unseen_cmd.index("--profile") + 1] == "unseen_recon"
    family = json.loads((tmp_path / "w" / "sim_unseen" / "family.json").read_text())
    assert family["validation"] == ["phantom_000", "phantom_001"] and len(family["test"]) == 3
    with pytest.raises(UniPETInputError, match="must leave >= 1 training subject"):
        tm.data(n_phantoms=4, n_val=2, n_test=2, real=False)


def test_ship_another_model_and_refuse_a_foreign_architecture(tmp_path, monkeypatch):
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    monkeypatch.setattr(train_models, "BUNDLE_ROOT", root)
    tm = train_models.TrainModels(str(tmp_path / "w"))
    src = _perturbed_default_net(tm.models / "vanilla" / "model_stage1.pt", 1)
    tm.ship(model="vanilla")
    assert (root / "models" / "model.pt").read_bytes() == src.read_bytes()
    with pytest.raises(UniPETInputError, match="cannot be shipped"):
        tm.ship(model="unet", overwrite=True)


def test_data_step_simulates_phantom_ranges_in_parallel(tmp_path, monkeypatch):
    runs = []
    monkeypatch.setattr(train_models, "_run", lambda cmd, threads: runs.append((cmd, threads)))
    monkeypatch.setattr(train_models, "_run_parallel", lambda cmds, threads: runs.append((cmds, threads)))
    tm = train_models.TrainModels(str(tmp_path / "w"))
    tm.data(n_phantoms=7, n_val=1, n_test=1, real=False, n_unseen=0, jobs=3)
    cmds, threads = runs[0]
    ranges = [(int(c[c.index("--first_subject") + 1]), int(c[c.index("--n_subjects") + 1])) for c in cmds]
    assert ranges == [(0, 2), (2, 5), (5, 7)] and threads == 1  # contiguous, disjoint, covering 0..6
    assert all(c[c.index("--seed") + 1] == str(train_models.PHANTOM_SEED) for c in cmds)


def test_all_ships_unipet_by_default(tmp_path, monkeypatch):
    tm = train_models.TrainModels(str(tmp_path / "w"))
    steps = []
    for name in ("data", "with_align", "branch", "full_run", "drf_specific"):
        monkeypatch.setattr(tm, name, lambda *a, _n=name, **k: steps.append(_n))
    monkeypatch.setattr(tm, "ship", lambda model="unipet", **k: steps.append(("ship", model)))
    tm.all()
    # 0.4.0 shipped vanilla; 0.5.0-0.5.1 UniPET trained without L_align; 0.5.2 with a dose-balanced stage 2
    assert steps[:2] == ["data", "with_align"] and steps[-1] == ("ship", "dose_balanced_s2")
    assert "dose_balanced_s2" in train_models.BRANCHES
    steps.clear()
    tm.all(ship_model="vanilla")
    assert steps[-1] == ("ship", "vanilla")


def test_runs_before_the_locked_validation_keep_their_selection(tmp_path, monkeypatch):
    """0.5.3 made training's validation score the level-locked output and stage 2 sample dose-balanced. The runs
    that predate it (the shipped 0.5.2 weights among them) must still select on the unlocked network and sample
    stage 2 as they did, or a rerun would train and pick other weights than the ones and the quality rows it
    reproduces; a run listed as new selects with the config's default."""
    runs = []
    monkeypatch.setattr(train_models, "_run", lambda cmd, threads: runs.append(cmd))
    tm = train_models.TrainModels(str(tmp_path / "w"))
    tm.datalist.parent.mkdir(parents=True)
    tm.datalist.write_text("{}")
    snapshot = tm.models / train_models.SNAPSHOT_RUN / train_models.SNAPSHOT
    snapshot.parent.mkdir(parents=True)
    snapshot.write_bytes(b"")
    for name in ("dose_balanced_s2", "focus_low_drf"):
        tm.branch(name)
    tm.with_align()
    legacy, new, stage1 = runs
    for cmd in (legacy, stage1):
        assert cmd[-4:] == ["--level_lock_fwhm_mm", "0", "--track_meta", "False"], cmd  # fire: "False", not "false"
    assert "--level_lock_fwhm_mm" not in new
    # and stage 2 is sampled as each run's own dose_balance says (the 0.5.3 default is 0.5 for stage 2)
    for cmd, balance in ((legacy, "0.5"), (new, "0.5"), (stage1, "0")):
        assert cmd[cmd.index("--stage2_dose_balance") + 1] == balance, cmd
    assert train_models.LOCKED_SELECTION_RUNS <= {
        *train_models.BRANCHES,
        *train_models.CONDITIONED_BRANCHES,
        *train_models.FULL_RUNS,
    }
