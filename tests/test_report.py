"""tools/report.py's trust sections on a fake seed sweep written here: Wilson interval cells, mean ± std over
seeds (against the statistics module), the paired comparison (against the hand count and the Newcombe / McNemar
reference of test_stats.py), AA on different images, the errors, the CLI; and pipeline.summary_table's cells."""
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from advcl_dist.config_schema import ConfigError
from advcl_dist.pipeline import summary_table, write_summary
from advcl_dist.report import write_report
from advcl_dist.report_compare import against_main
from tests.test_stats import HAND_A, HAND_B, newcombe_reference, wilson_by_root

ROOT = Path(__file__).resolve().parents[1]
N = 10  # test images
AA_INDEX = np.array([0, 2, 4, 6, 8])
SEEDS = (0, 1, 2)


def interval(flags) -> dict:
    k, n = int(np.sum(flags)), len(flags)
    low, high = wilson_by_root(k, n)
    return {"correct": k, "n": n, "low": round(100 * low, 2), "high": round(100 * high, 2)}


def percent(flags) -> float:
    return round(100 * float(np.mean(flags)), 2)


def write_run(folder: Path, method: str, flags: dict, new: bool = True) -> None:
    """results.json + flags.npz as evaluate.py writes them (`new`), or as before intervals and aa_index."""
    folder.mkdir(parents=True)
    result = {"dataset": "digits", "method": method, "finetune": "slf", "n_test": N,
              **{m: percent(flags[k]) for m, k in (("SA", "clean"), ("RA", "robust"), ("AA", "autoattack"))},
              "aa_subset": {"n": len(flags["autoattack"]), "SA": 0.0, "RA": 0.0, "AA": 0.0}}
    arrays = {"index": np.arange(N), **{k: np.asarray(flags[k], bool) for k in ("clean", "robust", "autoattack")}}
    if new:
        result["intervals"] = {m: interval(flags[k]) for m, k in (("SA", "clean"), ("RA", "robust"),
                                                                  ("AA", "autoattack"))}
        arrays["aa_index"] = np.asarray(flags.get("aa_index", AA_INDEX), np.int64)
    (folder / "results.json").write_text(json.dumps(result))
    np.savez(folder / "flags.npz", **arrays)


def seed_sweep(root: Path) -> dict:
    """Three seeds × (advcl, simclr) on the same 10 images; seed 0's SA flags are the hand-counted example."""
    rng = np.random.default_rng(1)
    points, flags = [], {}
    for seed in SEEDS:
        folder = f"{seed:02d}-seed={seed}"
        points.append({"folder": folder, "swept": {"train.seed": seed}, "overrides": {"train.seed": seed}})
        for method, hand in (("advcl", HAND_A), ("simclr", HAND_B)):
            flags[seed, method] = {"clean": np.array(hand, bool) if seed == 0 else rng.random(N) < 0.6,
                                   "robust": rng.random(N) < 0.4, "autoattack": rng.random(len(AA_INDEX)) < 0.4}
            write_run(root / folder / f"{method}-slf", method, flags[seed, method])
    (root / "sweep.json").write_text(json.dumps({"points": points}))
    return flags


def markdown_rows(text: str, first: str) -> list[list[str]]:
    """The cells of the markdown rows starting with `first` in the section of `text` after its heading."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first} ")]


def section(text: str, title: str) -> str:
    return text[text.index(title):].split("\n## ", 1)[0]


def test_report_shows_intervals_seed_spread_and_the_paired_comparison(tmp_path):
    flags = seed_sweep(tmp_path)
    text, n = write_report(tmp_path, ("advcl", "simclr"))
    assert n == 6
    # Intervals: seed 0 advcl is right on 7 of 10 images (SA), in the cell and in report.csv's own columns.
    low, high = (round(100 * v, 2) for v in wilson_by_root(7, 10))
    assert f"| 00-seed=0/advcl-slf | 0 | advcl | SLF | digits | 70.00 ({low:.2f}–{high:.2f}) |" in text
    assert "Wilson 95 % interval" in text
    table = list(csv.DictReader((tmp_path / "report.csv").read_text().splitlines()))
    assert (table[0]["run"], float(table[0]["SA"]), float(table[0]["SA_low"]), float(table[0]["SA_high"])) == (
        "00-seed=0/advcl-slf", 70.0, low, high)
    assert float(table[0]["AA_high"]) == interval(flags[0, "advcl"]["autoattack"])["high"]

    # Seeds: one row per method, mean ± sample std of the numbers written above.
    seeds = section(text, "## Mean ± std over seeds")
    for method in ("advcl", "simclr"):
        (row,) = markdown_rows(seeds, method)
        cells = [row[0], row[1], row[2], row[3]]
        assert cells == [method, "SLF", "digits", "3"]
        for cell, key in zip(row[4:], ("clean", "robust", "autoattack")):
            values = [percent(flags[s, method][key]) for s in SEEDS]
            assert cell == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    seed_csv = list(csv.DictReader((tmp_path / "report_seeds.csv").read_text().splitlines()))
    sa = [percent(flags[s, "simclr"]["clean"]) for s in SEEDS]
    assert float(seed_csv[1]["SA_mean"]) == pytest.approx(statistics.mean(sa))
    assert float(seed_csv[1]["SA_std"]) == pytest.approx(statistics.stdev(sa))

    # Paired comparison: seed 0's SA is the hand-counted example (+20 points, 3 / 1, p = 0.625).
    compare = section(text, "## Paired comparison advcl − simclr")
    lines = markdown_rows(compare, "0") + markdown_rows(compare, "1") + markdown_rows(compare, "2")
    assert lines[0][:5] == ["0", "SLF", "digits", "00-seed=0/advcl-slf", "00-seed=0/simclr-slf"]
    hand = newcombe_reference(HAND_A, HAND_B)
    assert lines[0][5:7] == [f"+20.00 ({hand['low']:+.2f} to {hand['high']:+.2f})", "3 / 1, p = 0.625"]
    differences = {m: [] for m in ("SA", "RA", "AA")}
    for seed, line in zip(SEEDS, lines):
        for i, (m, key) in enumerate((("SA", "clean"), ("RA", "robust"), ("AA", "autoattack"))):
            ref = newcombe_reference(flags[seed, "advcl"][key], flags[seed, "simclr"][key])
            differences[m].append(ref["difference"])
            assert line[5 + 2 * i] == f"{ref['difference']:+.2f} ({ref['low']:+.2f} to {ref['high']:+.2f})"
            assert line[6 + 2 * i] == f"{ref['a_only']} / {ref['b_only']}, p = {ref['p_value']:.3g}"
    (summary,) = markdown_rows(compare, "mean ± std (3 seeds)")
    assert summary[5::2] == [f"{statistics.mean(d):+.2f} ± {statistics.stdev(d):.2f}" for d in differences.values()]
    rows = list(csv.DictReader((tmp_path / "report_compare.csv").read_text().splitlines()))
    assert [r["kind"] for r in rows] == ["pair"] * 3 + ["mean ± std over seeds"]
    assert (float(rows[0]["SA_diff"]), int(rows[0]["SA_a_only"]), int(rows[0]["SA_b_only"]),
            float(rows[0]["SA_p"])) == (20.0, 3, 1, 0.625)
    assert float(rows[3]["RA_std"]) == pytest.approx(statistics.stdev(differences["RA"]), abs=1e-6)
    assert "## Paired comparison advcl − simclr" in (tmp_path / "report.md").read_text()


def test_aa_on_different_images_is_not_compared(tmp_path):
    flags = seed_sweep(tmp_path)
    np.savez(tmp_path / "02-seed=2" / "simclr-slf" / "flags.npz", index=np.arange(N),
             **{k: flags[2, "simclr"][k] for k in ("clean", "robust", "autoattack")}, aa_index=AA_INDEX + 1)
    compare = section(write_report(tmp_path, ("advcl", "simclr"))[0], "## Paired comparison")
    (line,) = markdown_rows(compare, "2")
    assert line[9:11] == ["AA on different images: not compared", "—"]
    ref = newcombe_reference(flags[2, "advcl"]["robust"], flags[2, "simclr"]["robust"])
    assert line[8] == f"{ref['a_only']} / {ref['b_only']}, p = {ref['p_value']:.3g}"  # SA and RA still compared
    (summary,) = markdown_rows(compare, "mean ± std (3 seeds)")
    aa = [newcombe_reference(flags[s, "advcl"]["autoattack"], flags[s, "simclr"]["autoattack"])["difference"]
          for s in (0, 1)]
    assert summary[9] == f"{statistics.mean(aa):+.2f} ± {statistics.stdev(aa):.2f} (2 of 3 seeds)"


def test_compare_errors_name_the_file_and_the_fix(tmp_path):
    seed_sweep(tmp_path)
    with pytest.raises(ConfigError, match="no run of 'advcl' has a run of 'rocl'.*methods found: advcl, simclr"):
        write_report(tmp_path, ("advcl", "rocl"))
    index_file = tmp_path / "01-seed=1" / "simclr-slf" / "flags.npz"
    saved = dict(np.load(index_file))
    np.savez(index_file, **{**saved, "index": np.arange(N) + 100})
    with pytest.raises(ConfigError, match=r"01-seed=1/advcl-slf/flags.npz and .*01-seed=1/simclr-slf/flags.npz "
                                          "hold different test images"):
        write_report(tmp_path, ("advcl", "simclr"))
    index_file.unlink()
    with pytest.raises(ConfigError, match=r"01-seed=1/simclr-slf/flags.npz is missing: re-run tools/evaluate.py"):
        write_report(tmp_path, ("advcl", "simclr"))
    assert not (tmp_path / "report.md").exists()  # nothing written half
    cli = subprocess.run([sys.executable, "tools/report.py", str(tmp_path), "--compare", "advcl", "simclr"],
                         cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stdout == ""
    assert cli.stderr.count("\n") == 1 and cli.stderr.startswith("error: ") and "flags.npz is missing" in cli.stderr


def test_cli_prints_the_table_the_seeds_and_the_comparison(tmp_path):
    seed_sweep(tmp_path)
    cli = subprocess.run([sys.executable, "tools/report.py", str(tmp_path), "--compare", "advcl", "simclr"],
                         cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    for part in ("| 00-seed=0/advcl-slf |", "## Mean ± std over seeds", "## Paired comparison advcl − simclr",
                 "| +20.00 (", "| 3 / 1, p = 0.625 |", "| mean ± std (3 seeds) |"):
        assert part in cli.stdout
    assert (tmp_path / "report.md").read_text().endswith(cli.stdout)
    assert "report_compare.csv" in cli.stderr


def test_old_results_show_plain_numbers_and_old_flags_pair_aa_on_the_first_images(tmp_path):
    rng = np.random.default_rng(2)
    flags = {m: {"clean": rng.random(N) < 0.5, "robust": rng.random(N) < 0.3, "autoattack": rng.random(4) < 0.3}
             for m in ("advcl", "simclr")}
    for method in flags:
        write_run(tmp_path / f"{method}-slf", method, flags[method], new=False)
    text, _ = write_report(tmp_path, ("advcl", "simclr"))
    sa = percent(flags["advcl"]["clean"])
    assert f"| advcl-slf | advcl | SLF | digits | {sa:.2f} |" in text
    assert "Wilson" not in text.split("## Paired")[0] and "Mean ± std" not in text  # no intervals, one seed
    row = next(csv.DictReader((tmp_path / "report.csv").read_text().splitlines()))
    assert row["SA"] == str(sa) and row["SA_low"] == row["AA_high"] == ""
    (line,) = markdown_rows(text, "SLF")
    ref = newcombe_reference(flags["advcl"]["autoattack"], flags["simclr"]["autoattack"])
    assert line[8] == f"{ref['difference']:+.2f} ({ref['low']:+.2f} to {ref['high']:+.2f})"


def result_row(intervals: bool) -> dict:
    row = {"method": "advcl", "finetune": "slf", "dataset": "digits", "SA": 77.5, "RA": 25.56, "AA": 18.0,
           "aa_subset": {"n": 50, "SA": 78.0, "RA": 20.0, "AA": 18.0}}
    if intervals:
        row["intervals"] = {"SA": {"correct": 279, "n": 360, "low": 72.89, "high": 81.58},
                            "RA": {"correct": 92, "n": 360, "low": 21.32, "high": 30.25},
                            "AA": {"correct": 9, "n": 50, "low": 9.77, "high": 30.81}}
        row["aa_subset"]["intervals"] = {"SA": {"correct": 39, "n": 50, "low": 64.76, "high": 87.25},
                                         "RA": {"correct": 10, "n": 50, "low": 11.24, "high": 33.04},
                                         "AA": {"correct": 9, "n": 50, "low": 9.77, "high": 30.81}}
    return row


def test_summary_table_shows_intervals_when_the_results_have_them():
    table = summary_table([result_row(True)])
    assert ("| advcl | SLF | digits | 77.50 (72.89–81.58) | 25.56 (21.32–30.25) | 18.00 (9.77–30.81) | 50 "
            "| 78.00 (64.76–87.25) / 20.00 (11.24–33.04) / 18.00 (9.77–30.81) |") in table
    assert "95 % Wilson interval over the images counted" in table
    old = summary_table([result_row(False), {**result_row(False), "AA": None, "aa_subset": None}])
    assert "| advcl | SLF | digits | 77.50 | 25.56 | 18.00 | 50 | 78.00 / 20.00 / 18.00 |" in old
    assert "| advcl | SLF | digits | 77.50 | 25.56 | — | — | — |" in old and "Wilson" not in old


def test_a_method_swept_as_train_method_pairs_with_the_baseline_of_its_own_pipeline(tmp_path):
    rng = np.random.default_rng(3)
    points = []
    for i, (swept, methods) in enumerate((("advcl", ("advcl", "simclr")), ("simclr", ("simclr",)))):
        folder = f"{i:02d}-method={swept}"
        points.append({"folder": folder, "swept": {"train.method": swept}})
        for method in methods:
            write_run(tmp_path / folder / f"{method}-slf", method,
                      {"clean": rng.random(N) < 0.5, "robust": rng.random(N) < 0.3, "autoattack": rng.random(5) < 0.3})
    (tmp_path / "sweep.json").write_text(json.dumps({"points": points}))
    compare = section(write_report(tmp_path, ("advcl", "simclr"))[0], "## Paired comparison")
    (line,) = markdown_rows(compare, "SLF")
    assert line[2:4] == ["00-method=advcl/advcl-slf", "00-method=advcl/simclr-slf"]


def test_a_pipeline_summary_pairs_its_method_with_every_other_one(tmp_path):
    """pipeline.write_summary's section: the hand-counted example as advcl − simclr, and a run without flags
    named instead of compared."""
    rng = np.random.default_rng(4)
    hand = {"advcl": HAND_A, "simclr": HAND_B}
    for method in ("advcl", "simclr", "rocl"):
        flags = {"clean": np.array(hand.get(method, rng.random(N) < 0.5), bool), "robust": rng.random(N) < 0.3,
                 "autoattack": rng.random(len(AA_INDEX)) < 0.3}
        write_run(tmp_path / f"{method}-slf", method, flags)
    (tmp_path / "rocl-slf" / "flags.npz").unlink()
    rows = [{**json.loads((tmp_path / f"{m}-slf" / "results.json").read_text()),
             "attack": {"pgd_steps": 20, "eps_255": 8.0}} for m in ("advcl", "simclr", "rocl")]
    write_summary(rows, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    (line,) = markdown_rows(text, "advcl − simclr")
    assert line[1] == "SLF" and line[2] == "+20.00 ({low:+.2f} to {high:+.2f}), p = 0.62".format(
        **newcombe_reference(HAND_A, HAND_B))
    assert "- advcl − rocl: not computed (" in text and "rocl-slf/flags.npz is missing" in text
    assert against_main(tmp_path, "nobody") == ""
