"""The cost study (benchmarks/cost_study.py) runs its arms end to end on a tiny Megapixel MNIST and counts
what each encodes; a rerun resumes, and the report keeps every arm that finished."""

import json

import pytest

from benchmarks import cost_study


def test_the_study_counts_each_arms_encodes_and_keeps_finished_arms(tmp_path, mnist_dir, capsys):
    out = tmp_path / "study"
    base = ["--image-size", "128", "--train", "16", "--val", "8", "--epochs", "1", "--threads", "1",
            "--digits", str(mnist_dir), "--out", str(out)]
    asked = ["exact 1.0", "exact 0.25", "cached 0.25", "cached+refresh N/4 0.25"]
    assert cost_study.main([*base, "--arms", *asked]) == 0
    arms = json.loads((out / "study.json").read_text())["arms"]
    assert list(arms) == asked
    # 128 px: 4 cells of 64 px; sampling 0.25 gives k = 1; max_sampled 1.0 gives 4 inner iterations.
    exact, cached = arms["exact 1.0"], arms["cached 0.25"]
    assert exact["encoded_with_grad_per_epoch"] == [16 * 4] and exact["encoded_no_grad_per_epoch"] == [16 * 4]
    assert cached["encoded_with_grad_per_epoch"] == [16 * 1]
    assert cached["encoded_no_grad_per_epoch"] == [16 * 4]  # every image's first visit fills it whole
    assert cached["store"] and exact["store"] is None
    # Each arm is held to the exact arm that samples as much of an image per step.
    assert [arms[name].get("reference") for name in asked] == [None, "exact 1.0", "exact 0.25", "exact 0.25"]
    for name in asked[1:]:
        only_arm, only_exact, p = arms[name]["mcnemar_vs_exact"]
        assert only_arm + only_exact <= 8 and 0 < p <= 1
    assert "| cached+refresh N/4 0.25 | " in (out / "study.md").read_text()
    assert all((out / "runs" / run / "val_correct.npy").exists() for run in ("exact_1.0", "cached_0.25"))

    capsys.readouterr()
    assert cost_study.main([*base, "--arms", "exact 1.0"]) == 0  # finished: reported, not trained again
    assert "== exact 1.0" not in capsys.readouterr().out
    assert list(json.loads((out / "study.json").read_text())["arms"]) == list(arms)

    with pytest.raises(SystemExit) as stop:
        cost_study.main([*base, "--arms", "cached 0.3"])
    assert stop.value.code == 2
    assert "cached 0.3" in capsys.readouterr().err

    capsys.readouterr()
    assert cost_study.main(["--combine", str(out), str(out)]) == 0  # one size, its seeds side by side
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| cached 0.25 (vs exact 0.25) |"))
    acc = f"{arms['cached 0.25']['best_accuracy']:.3f}"
    assert row.split(" | ")[1] == f"{acc} / {acc}"
    assert table.count("\n| ") == 1 + len(asked)
