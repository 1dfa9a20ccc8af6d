"""The benchmarks run end to end on a tiny configuration and record what they measured.

Nothing here asserts on speed (timings depend on the machine); memory on the CPU is counted, not timed,
so its growth with image size is checked.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import build_parser, main

TINY = ["--backbone", "test_resnet", "--patch-size", "32", "--latent-dim", "8", "--head-width", "8",
        "--num-classes", "3", "--threads", "1", "--device", "cpu"]
TIMING = ["--repeats", "1", "--warmup", "0"]


@pytest.fixture(autouse=True)
def restore_threads():
    """``--threads`` sets torch's process-wide thread count; the rest of the suite keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_bench(out, name, *flags):
    assert main([name, *TINY, "--out", str(out), *flags]) == 0
    record = json.loads((out / f"{name}.json").read_text())
    assert record["benchmark"] == name and record["machine"]["device"] == "cpu"
    return record


@pytest.mark.parametrize("name", ["fill", "step", "memory", "inference", "scaling", "slide"])
def test_every_benchmark_is_registered(name):
    args = build_parser().parse_args([name])
    assert args.benchmark == name and callable(args.func)


@pytest.mark.parametrize("argv", [["-m", "benchmarks.step", "--help"], ["-m", "benchmarks", "step", "--help"]])
def test_python_m_entry_points_print_help(argv):
    # from the repository root, as RESULTS.md's commands run them
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert "--image-sizes" in done.stdout and "--device" in done.stdout


def test_fill(tmp_path):
    results = run_bench(tmp_path, "fill", "--image-sizes", "64", "96", "--fill-batch-size", "3", *TIMING)["results"]
    assert [r["patches"] for r in results["sizes"]] == [2 * 2, 3 * 3]
    for row in results["sizes"]:
        assert row["ratio"] > 0 and row["fill_z_patches_per_s"] > 0 and row["backbone_patches_per_s"] > 0
        assert row["cut_gather_s"] > 0 and row["cut_rows_s"] > 0
    assert results["worst_ratio"] == min(r["ratio"] for r in results["sizes"])


def test_step(tmp_path):
    results = run_bench(tmp_path, "step", "--image-sizes", "64", "--batch-size", "2", "--sampling", "0.5",
                        *TIMING)["results"]
    (row,) = results["sizes"]
    assert row["patches_per_image"] == math.ceil(0.5 * 4) and row["inner_iterations"] == 2
    for key in ("step_s", "parts_s", "gd_step_s", "ratio_step_to_parts", "ratio_step_to_gd", "step_fill_s",
                "step_inner_s", "parts_fill_s", "parts_inner_s"):
        assert row[key] > 0, key


def test_memory_patchgd_grows_less_than_gd(tmp_path):
    results = run_bench(tmp_path, "memory", "--image-sizes", "64", "128", "--patches", "1",
                        "--batch-size", "2")["results"]
    peaks = {method: [r["peak_bytes"] for r in summary["sizes"]] for method, summary in results["methods"].items()}
    assert peaks["patchgd"][1] - peaks["patchgd"][0] < peaks["gd"][1] - peaks["gd"][0]
    small, large = results["methods"]["patchgd"]["sizes"]
    assert large["input_bytes"] - small["input_bytes"] == 2 * 3 * (128**2 - 64**2)  # uint8 pixels
    assert large["z_bytes"] == 2 * 8 * 4 * 4 * 4  # 2 images x latent 8 x 4 x 4 cells, float32
    assert (tmp_path / "memory.png").stat().st_size > 0


def test_memory_from_slides_holds_no_image(tmp_path):
    results = run_bench(tmp_path, "memory", "--image-sizes", "64", "128", "--patches", "1", "--methods", "patchgd",
                        "--input", "slide", "--batch-size", "2")["results"]
    small, large = results["methods"]["patchgd"]["sizes"]
    assert small["input_bytes"] == large["input_bytes"] == 0
    # Z and index tensors grow with the image; less than the uint8 pixels the step no longer holds.
    assert large["peak_bytes"] - small["peak_bytes"] < 2 * 3 * (128**2 - 64**2)


def test_slide(tmp_path):
    import numpy as np

    from slide_files import he_tile, write_pyramid_tiff

    canvas = np.full((320, 384, 3), 245, np.uint8)
    canvas[40:280, 60:300] = he_tile()
    write_pyramid_tiff(tmp_path / "s.tif", canvas, tile=64, levels=2)
    results = run_bench(tmp_path, "slide", "--slide", str(tmp_path / "s.tif"), "--patch-size", "64", "--workers",
                        "1", "--patches", "2", "--throughput-patches", "8", "--fill-batch-size", "4",
                        *TIMING)["results"]
    (row,) = results["sizes"]
    assert row["predict"]["cells"] == 5 * 6 and 0 < row["predict"]["tissue_cells"] < 30
    assert row["predict"]["peak_rss_bytes"] > 0 and row["step"]["step_s"] > 0 and row["step"]["cached_step_s"] > 0
    assert row["step"]["store_bytes"] == 30 * (8 * 2 + 8)  # every cell: its latent-8 float16 code and its stamp
    assert results["throughput"]["patches"] == 8 and results["throughput"]["ratio"] > 0
    assert results["throughput"]["ratio_hed"] > 0 and results["throughput"]["hed"] == 0.05


def test_inference(tmp_path):
    results = run_bench(tmp_path, "inference", "--image-sizes", "64", *TIMING)["results"]
    (row,) = results["sizes"]
    for arm in ("gd", "patchgd", "patchgd-64", "reference"):
        assert row[f"{arm}_images_per_s"] > 0 and row["peak_bytes"][arm] > 0
    # The paper's loop and the library's fill give the same logits: only chunking and cutting differ.
    assert row["max_logit_difference_to_reference"] < 1e-5


def test_scaling_alone_measures_one_process(tmp_path):
    results = run_bench(tmp_path, "scaling", "--image-sizes", "64", "--batch-size", "2", *TIMING)["results"]
    (row,) = results["sizes"]
    assert results["processes"] == row["processes"] == 1
    assert row["images_per_s_1"] == pytest.approx(2 / row["step_alone_s"])
    assert row["efficiency"] == pytest.approx(row["step_alone_s"] / row["step_together_s"])
    assert row["fill_speedup"] == pytest.approx(row["fill_alone_s"] / row["parallel_fill_s"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a CUDA device")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--device cuda was given but torch sees no CUDA device"):
        main(["fill", *TINY[:-2], "--device", "cuda", "--out", str(tmp_path)])


def test_diagnose_records_inner_losses_gradient_norms_and_batchnorm_statistics(tmp_path):
    from patchgd.cli import PACKAGED_CONFIGS
    from patchgd.data.prepare.megapixel_mnist import generate_megapixel_mnist

    data = generate_megapixel_mnist(tmp_path / "data", train=8, val=4, image_size=128, noise=2, progress=False)
    assert main(["diagnose", "--config", str(PACKAGED_CONFIGS / "demo.yaml"), "--set", f"data.root={data}",
                 "--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "patchgd.fill_mode=train",
                 "--threads", "1", "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "diagnose.json").read_text())
    epochs = record["results"]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for epoch in epochs:
        assert len(epoch["loss_per_inner_iteration"]) == 4  # sampling 0.25 of a 2 x 2 grid, max_sampled 1: zeta 4
        assert epoch["updates"] == 2 * 4  # two batches, an update per inner iteration (epsilon 1)
        assert epoch["grad_norm_backbone"] > 0 and epoch["grad_norm_head"] > 0 and epoch["grad_norm_projection"] > 0
        assert epoch["bn_distance_fill"] > 0 and epoch["bn_distance_inner"] > 0  # both phases in train mode
        assert 0 <= epoch["val_accuracy"] <= 1 and 0 <= epoch["val_accuracy_batch_stats"] <= 1


def test_cached_step_times_every_arm_on_one_batch(capsys):
    """benchmarks/cached_step.py on a tiny batch: every arm timed, per-patch encode costs measured."""
    from benchmarks import cached_step

    assert cached_step.main(["--image-size", "128", "--batch", "2", "--repeats", "1"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(record["median_step_s"]) == {"exact", "cached", "cached+refresh", "two-stage"}
    assert all(len(times) == 1 and times[0] > 0 for times in record["step_s"].values())
    assert all(cost > 0 for cost in record["encode_s_per_patch"].values())
