"""benchmarks/ceiling.py: a rank's minimum work is what the full model computes for that rank's tokens."""

import json

import pytest
import torch

from benchmarks import ceiling
from benchmarks.workloads import build


@pytest.mark.parametrize("n", [2, 3, 4])
def test_a_causal_rank_with_the_earlier_tokens_cached_gives_the_full_models_logits(n):
    workload = build("gpt2", small=True)
    ids = workload.inputs["input_ids"]
    with torch.inference_mode():
        full = workload.model(input_ids=ids).logits
        for rank in range(n):
            start, end = ceiling.shard_bounds(ids.shape[1], n, rank)
            prepare, run = ceiling.rank_call(workload, n, rank)
            out = run(prepare()).logits  # the timed call: the shard's last token's logits
            torch.testing.assert_close(out[:, -1], full[:, end - 1], atol=1e-5, rtol=1e-5)


def test_shards_match_the_runtime_layout():
    assert [ceiling.shard_bounds(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert ceiling.shard_bounds(197, 4, 0) == (0, 50)


def test_rows_and_markdown(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text(f"before\n{ceiling.MARKDOWN_START}\nold\n{ceiling.MARKDOWN_END}\nafter\n")
    out = tmp_path / "ceiling.json"
    ceiling.main(["--workloads", "gpt2", "vit", "--n", "2", "--runs", "2", "--threads", "1", "--machine", "test",
                  "--out", str(out), "--markdown", str(doc), "--small"])
    rows = json.loads(out.read_text())
    assert [(r["workload"], r["N"]) for r in rows] == [("gpt2", 2), ("vit", 2)]
    for row in rows:
        assert row["ceiling"] == pytest.approx(row["single"]["median_s"] / row["ranks"][str(row["slowest_rank"])]["median_s"])
        assert row["single"]["runs"] == 2 and set(row["ranks"]) == {"0", "1"} and row["machine"] == "test"
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert text.count("| test | 1 | gpt2") == 1 and text.count("| test | 1 | vit") == 1


def test_render_writes_the_section_from_row_files(tmp_path):
    rows = [{"machine": "m", "threads": 2, "workload": "gpt2", "tokens": 1024, "N": 4, "causal": True,
             "single": {"median_s": 1.6, "p10_s": 1.5, "p90_s": 1.7, "runs": 8},
             "ranks": {"3": {"median_s": 0.4, "p10_s": 0.39, "p90_s": 0.42, "runs": 8}}, "slowest_rank": 3,
             "ceiling": 4.0, "ceiling_pairs_p10": 3.8, "ceiling_pairs_p90": 4.1, "date": "d", "command": "c"}]
    source, doc = tmp_path / "rows.json", tmp_path / "doc.md"
    source.write_text(json.dumps(rows))
    doc.write_text(f"{ceiling.MARKDOWN_START}\n{ceiling.MARKDOWN_END}\n")
    ceiling.main(["--render", str(source), "--markdown", str(doc)])
    assert ("| m | 2 | gpt2 (1024 tokens) | 4 | 1.600 s (1.500–1.700) | rank 3: 0.400 s (0.390–0.420) | **4.00×** "
            "(3.80–4.10) | d | `c` |") in doc.read_text()
