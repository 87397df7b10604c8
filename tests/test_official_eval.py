"""bench.official: an official-format checkpoint through the harness (params, GMACs, VAE-decoded samples as an ADM
.npz, FID against reference statistics, one CSV row), at toy scale: a DiT saved as a bare state_dict (the released
DiT-XL-2-256x256.pt layout), a tiny AutoencoderKL and the stand-in feature extractor of the metric tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakedata import fake_official_dit, tiny_vae
from helpers import register_tiny_extractor

from bench import official
from bench.fid import score_npz
from bench.metrics import InceptionMetric, write_statistics
from bench.results_csv import read_rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("official")
    ckpt = fake_official_dit(base / "DiT-cpu-2-16x16.pt", size="cpu", input_size=8, num_classes=2)
    vae = tiny_vae(base / "vae")
    rng = np.random.default_rng(0)
    reference = torch.from_numpy(rng.integers(0, 256, (64, 3, 16, 16), dtype=np.uint8))
    extractor = register_tiny_extractor()
    stats = InceptionMetric(reference, None, feature_extractor=extractor).reference_statistics()
    ref = write_statistics(base / "ref.npz", *stats)  # (mu, sigma)
    return {"ckpt": ckpt, "vae": vae, "ref": ref, "extractor": extractor, "base": base}


def args_for(files, *extra):
    return official.parser().parse_args(
        ["--backbone", "dit", "--size", "cpu", "--patch-size", "2", "--checkpoint", str(files["ckpt"]),
         "--image-size", "16", "--num-classes", "2", "--vae", str(files["vae"]), "--reference", str(files["ref"]),
         "--num-samples", "12", "--steps", "3", "--cfg-scale", "1.5", "--batch-size", "8", "--device", "cpu",
         "--results-dir", str(files["base"] / "results"), "--no-progress", *extra])


def test_official_checkpoint_evaluation_writes_samples_score_and_row(files):
    import backbones
    from bench.flops import forward_gmacs

    scorer = InceptionMetric.from_statistics(files["ref"], feature_extractor=files["extractor"])
    row = official.evaluate(args_for(files), scorer=scorer)
    model = backbones.build("dit", size="cpu", patch_size=2, input_size=8, in_channels=4, num_classes=2)
    model.load_state_dict(torch.load(files["ckpt"], weights_only=True))
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert row["gmacs"] == pytest.approx(forward_gmacs(model, 8, 4))
    assert row["vae_gmacs"] > 0 and row["image_size"] == 8 and row["channels"] == 4
    npz = files["base"] / "results" / "imagenet" / "official" / f"{row['point_key']}.npz"
    samples = np.load(npz)["arr_0"]
    assert samples.shape == (12, 16, 16, 3) and samples.dtype == np.uint8  # decoded pixels, NHWC
    # the row's FID is the FID of the written .npz, scored independently
    again = score_npz(npz, files["ref"], feature_extractor=files["extractor"])
    assert row["metric_value"] == pytest.approx(again["metric_value"], rel=1e-9)
    rows = read_rows(files["base"] / "results" / "imagenet" / "runs.csv")
    assert [r["point_key"] for r in rows] == [row["point_key"]]
    assert rows[0]["metric_name"] == f"fd_{files['extractor']}" and rows[0]["run_key"].startswith("official-")
    # same checkpoint and protocol: the row is replaced, not duplicated; another protocol adds a row
    official.evaluate(args_for(files), scorer=scorer)
    official.evaluate(args_for(files, "--seed", "1"), scorer=scorer)
    assert len(read_rows(files["base"] / "results" / "imagenet" / "runs.csv")) == 2


def test_official_cli_errors_exit_2(files, capsys):
    assert official.main(["--backbone", "dit", "--size", "cpu", "--checkpoint", str(files["base"] / "nope.pt"),
                          "--reference", str(files["ref"])]) == 2
    assert "no such file" in capsys.readouterr().err
    assert official.main(["--backbone", "dit", "--size", "XL", "--patch-size", "2", "--checkpoint",
                          str(files["ckpt"]), "--image-size", "16", "--num-classes", "2", "--vae", str(files["vae"]),
                          "--reference", str(files["ref"]), "--num-samples", "2", "--device", "cpu"]) == 2
    assert "does not match" in capsys.readouterr().err  # wrong preset for the file: strict load names the keys
