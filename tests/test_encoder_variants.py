"""benchmarks.encoder_variants: every variant gives the reference's codes (ties and steps included), the tuning
constants come back after a variant, and a run records what it timed and profiled."""

import json

import pytest
import torch

from benchmarks import encoder_variants
from benchmarks.encoder_variants import codeword_major, main, variants
from transformers_astra import quantizer as vq


@pytest.mark.parametrize("size", [128, 96])  # 96: not a multiple of 64, so "blocks of 64" is left out
def test_every_variant_gives_the_reference_codes_with_duplicate_codewords_and_ties(size):
    generator = torch.Generator().manual_seed(5)
    centres = torch.randn(3, size, 8, generator=generator)
    centres[:, 7] = centres[:, 2]  # a duplicate: the lower index must win
    points = torch.randn(3, 40, 8, generator=generator)
    points[:, :5] = centres[:, 2:7]  # points on codewords, one of them on the duplicate
    summary = vq.codebook_summary(centres)
    reference = vq.reference_nearest_codewords(points, centres)
    assert (reference[:, 0] == 2).all()
    forms = variants(points, centres, summary)
    assert ("blocks of 64" in forms) == (size == 128) and {"current", "steps of 2^18", "min over K", "codeword-major"} <= set(forms)
    for name, form in forms.items():
        assert torch.equal(form(), reference), name
    assert vq._ONE_STEP_FACTOR == 4 and vq._ARGMIN_BLOCK == 32  # each variant's constants were put back


def test_codeword_major_steps_over_groups_and_rechecks_non_finite_points():
    generator = torch.Generator().manual_seed(6)
    centres, points = torch.randn(6, 32, 4, generator=generator), torch.randn(6, 20, 4, generator=generator)
    points[1, 3, 0] = float("nan")
    summary = vq.codebook_summary(centres)
    reference = vq.reference_nearest_codewords(points, centres)
    # 32 * 20 scores a group: a budget of 100 elements (x the one-step factor 4) makes steps of 1 group
    assert torch.equal(codeword_major(points, centres, summary, 100), reference)
    assert torch.equal(codeword_major(points, centres, summary, 1 << 20), reference)


def test_constants_are_restored_when_the_variant_raises():
    def fails():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        encoder_variants.with_constants(fails, _ARGMIN_BLOCK=16)()
    assert vq._ARGMIN_BLOCK == 32


def test_a_smoke_run_appends_rows_with_every_variant_and_the_operator_table(tmp_path):
    out = tmp_path / "variants.json"
    out.write_text(json.dumps([{"earlier": True}]))
    main(["--out", str(out), "--smoke", "--threads", "1", "--machine", "test"])
    rows = json.loads(out.read_text())
    assert rows[0] == {"earlier": True} and len(rows) == 2
    row = rows[1]
    assert row["setting"] == "kv G=16 K=256" and row["groups"] == 32 and row["tokens"] == 16 and row["threads"] == 1
    assert {"current", "steps of 2^19", "blocks of 16", "blocks of 64", "min over K", "codeword-major"} <= set(row["timings"])
    assert all(t["median_ms"] > 0 and t["p10_ms"] <= t["median_ms"] <= t["p90_ms"] for t in row["timings"].values())
    operators = {p["operator"] for p in row["profile_current"]}
    assert "aten::amin" in operators and all(p["self_ms_per_encode"] >= 0 and p["calls_per_encode"] > 0 for p in row["profile_current"])
    assert row["command"].startswith("python -m benchmarks.encoder_variants --out ") and row["machine"] == "test"
