"""benchmarks.encoder_forms: every form of the score product is the same scores, and a run records what it timed."""

import json

import torch

from benchmarks.encoder_forms import main, score_forms


def test_every_score_form_gives_the_distance_scores_the_encoder_uses():
    generator = torch.Generator().manual_seed(3)
    points, centres = torch.randn(4, 10, 6, generator=generator), torch.randn(4, 16, 6, generator=generator)
    # |x - c|^2 - |x|^2 = |c|^2 - 2 x.c, in float64 the obvious way.
    expected = (points.double()[:, :, None] - centres.double()[:, None]).square().sum(-1) - points.double().square().sum(-1)[..., None]
    for name, form in score_forms(points, centres).items():
        scores = form()
        assert scores.shape == (4, 10, 16), name
        torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-4, msg=name)
        assert torch.equal(scores.argmin(-1), expected.argmin(-1)), name


def test_a_smoke_run_appends_rows_with_every_timing_and_its_command(tmp_path):
    out = tmp_path / "forms.json"
    out.write_text(json.dumps([{"earlier": True}]))
    main(["--out", str(out), "--smoke", "--threads", "1", "--machine", "test"])
    rows = json.loads(out.read_text())
    assert rows[0] == {"earlier": True} and len(rows) == 2
    row = rows[1]
    assert row["setting"] == "kv G=16 K=256" and row["group_width"] == 48 and row["threads"] == 1 and row["tokens"] == 16
    timings = row["timings"]
    assert {"encode", "scores (baddbmm)", "scores (addmm per group)", "reference GEMM", "rest of encode"} <= set(timings)
    assert all(t["median_ms"] > 0 and t["p10_ms"] <= t["median_ms"] <= t["p90_ms"] for n, t in timings.items() if n != "rest of encode")
    assert timings["rest of encode"]["median_ms"] == timings["encode"]["median_ms"] - timings["scores (baddbmm)"]["median_ms"]
    assert timings["scores (baddbmm)"]["gflop_s"] > 0 and row["command"].startswith("python -m benchmarks.encoder_forms --out ")
    assert row["machine"] == "test" and row["torch"] == torch.__version__
