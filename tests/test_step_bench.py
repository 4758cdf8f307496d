"""The kernel-variant bench (``musetalk.step_bench``) on the CPU with tiny weights: the
variant names, the subprocess per variant and the rows it reports. Its figures mean
something only on the GPU (docs/BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest

from musetalk.step_bench import main, variant_options


def test_variant_names_join_their_options():
    assert variant_options("baseline") == {"fuse_step": False, "inductor": {}, "upsample": "nearest",
                                           "crop_row": 96}
    assert variant_options("fused+freezing") == {"fuse_step": True, "inductor": {"freezing": True},
                                                 "upsample": "nearest", "crop_row": 96}
    assert variant_options("subpixel+fused")["upsample"] == "subpixel"
    assert variant_options("transposed+crop108") == {"fuse_step": False, "inductor": {}, "upsample": "transposed",
                                                     "crop_row": 108}
    assert variant_options("freezing+autotune")["inductor"] == {"freezing": True, "max_autotune": True}
    assert variant_options("transposed+crop108+autotune_pw+cdt")["inductor"] == {
        "max_autotune_pointwise": True, "coordinate_descent_tuning": True}
    assert variant_options("autotune_mm")["inductor"] == {"max_autotune_gemm": True}
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


def test_kernel_names_are_sorted_into_kinds_of_work():
    from musetalk.step_bench import kernel_category

    assert kernel_category("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc") == "conv"
    assert kernel_category("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT") == "gemm"
    assert kernel_category("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>") == "attention"
    assert kernel_category("triton_red_fused_native_group_norm_0") == "reduction"
    assert kernel_category("triton_poi_fused_add_silu_3") == "pointwise"
    # Inductor names its kernels after the operators it fused: still pointwise work.
    assert kernel_category("triton_poi_fused__to_copy_add_clone_convolution_div_expand_mul_silu") == "pointwise"
    assert kernel_category("triton_red_fused_convolution_native_group_norm_1") == "reduction"
    assert kernel_category("Memcpy DtoH (Device -> Pinned)") == "copy"
    assert kernel_category("aten::mkldnn_convolution") == "conv"
    assert kernel_category("aten::addmm") == "gemm"
    assert kernel_category("some_unknown_kernel") == "other"


def test_a_profile_gives_each_kind_of_works_ms_per_step(tmp_path):
    out = tmp_path / "steps.json"
    rc = main(["--device", "cpu", "--size", "tiny", "--variants", "baseline", "--batches", "2", "--steps", "1",
               "--profile", "2", "--timeout-s", "300", "--json", str(out)])
    assert rc == 0
    kernels = json.loads(out.read_text())[0]["rows"][0]["kernels"]
    assert kernels["steps"] == 2 and kernels["total_ms"] > 0
    # The CPU's operators stand in for the kernels: the UNet's attention and both
    # models' convolutions are there.
    assert kernels["by_kind_ms"]["conv"] > 0 and kernels["by_kind_ms"]["attention"] > 0
    assert kernels["total_ms"] == pytest.approx(sum(kernels["by_kind_ms"].values()), abs=0.01)
    assert kernels["top"] and all(t["kind"] in kernels["by_kind_ms"] for t in kernels["top"])
    # Each kind's costliest, up to 5, costliest first, whatever the overall list shows.
    by_kind = kernels["top_by_kind"]
    assert set(by_kind) == set(kernels["by_kind_ms"])
    for kind, items in by_kind.items():
        assert 1 <= len(items) <= 5 and all(t["kind"] == kind for t in items)
        assert [t["ms"] for t in items] == sorted((t["ms"] for t in items), reverse=True)
        assert items[0]["ms"] <= kernels["by_kind_ms"][kind] + 0.001
