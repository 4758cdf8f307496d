"""The kernel-variant bench (``musetalk.step_bench``) on the CPU with tiny weights: the
variant names, the subprocess per variant and the rows it reports. Its figures mean
something only on the GPU (docs/BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest

from musetalk.step_bench import main, variant_options


def test_variant_names_join_their_options():
    assert variant_options("baseline") == {"fuse_step": False, "inductor": {}, "upsample": "nearest"}
    assert variant_options("fused+freezing") == {"fuse_step": True, "inductor": {"freezing": True},
                                                 "upsample": "nearest"}
    assert variant_options("subpixel+fused")["upsample"] == "subpixel"
    assert variant_options("freezing+autotune")["inductor"] == {"freezing": True, "max_autotune": True}
    with pytest.raises(ValueError, match="unknown variant 'fast'.*baseline"):
        variant_options("fused+fast")


def test_an_unknown_variant_fails_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown variant"):
        main(["--variants", "baseline,nope", "--json", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_each_variant_runs_in_its_own_process_and_reports_its_rows(tmp_path):
    out = tmp_path / "steps.json"
    rc = main(["--device", "cpu", "--size", "tiny", "--variants", "baseline,fused+subpixel", "--batches", "1,2",
               "--steps", "2", "--timeout-s", "300", "--json", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())
    assert [r["variant"] for r in results] == ["baseline", "fused+subpixel"]
    assert results[1]["options"]["fuse_step"] is True and results[1]["options"]["upsample"] == "subpixel"
    for r in results:
        assert [row["batch"] for row in r["rows"]] == [1, 2]
        for row in r["rows"]:
            assert row["step_ms"] > 0 and row["frames_per_s"] > 0
            assert row["ms_per_frame"] == pytest.approx(row["step_ms"] / row["batch"], rel=1e-3)
