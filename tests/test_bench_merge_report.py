"""benchmarks/bench_merge.py's report (issue 18): ``--table`` and the README's merge headline read the format the
script writes now (runs x config dtypes x methods), and the report of the old format (one float32 run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simmerge_bandit import docgen

ROOT = Path(__file__).resolve().parent.parent
bm = docgen.bench_script("bench_merge")


def _entry(ours_s: float, mk_s: float | None, merge_s: float, load: float) -> dict:
    e = {"ours": {"wall_s": ours_s, "peak_rss_bytes": 600_000_000, "merge_s": merge_s, "bytes_read": 3_000_000_000,
                  "bytes_written": 1_000_000_000, "gb_per_s_merge": round(4 / merge_s, 3), "load_before": [load, 1, 1],
                  "load_after": [load, 1, 1]},
         "memcpy_gb_per_s": 20.0 + load, "memcpy_floor_s": 0.2, "merge_over_memcpy": round(merge_s / 0.2, 1),
         "file_floor": {"bytes_read": 3_000_000_000, "read_s": 0.3, "write_s": 0.2, "seconds": 0.5},
         "merge_over_file_floor": round(merge_s / 0.5, 1)}
    if mk_s is not None:
        e.update(mergekit={"wall_s": mk_s, "peak_rss_bytes": 2_000_000_000, "load_before": [load + 1, 1, 1],
                           "load_after": [load, 1, 1]},
                 speedup_wall=round(mk_s / ours_s, 2), rss_ratio_ours_over_mergekit=0.3,
                 outputs={"same_tensor_names": True, "differing_fraction": 0.0, "max_tensor_rel_l2_diff": 0.0})
    return e


def new_report() -> dict:
    """Three runs of bf16 and float32 configs (TIES speedups 2x, 6x, 4x on bf16), as bench_merge.py writes them."""
    runs = []
    for i, (bf16_mk, f32_mk) in enumerate(((20.0, 150.0), (60.0, 160.0), (40.0, 170.0))):
        runs.append({"load_before": [1.0, 1, 1], "load_after": [1.0, 1, 1], "dtypes": {
            "bfloat16": {"linear": _entry(2.0, 7.0, 1.0, 1.5 + i), "ties": _entry(10.0, bf16_mk, 8.0, 2.5 + i)},
            "float32": {"linear": _entry(2.5, 9.0, 1.2, 1.0), "ties": _entry(12.0, f32_mk, 9.0, 1.0)}}})
    return {"machine": {"cpus": 2, "platform": "test", "torch": "2.x", "torch_threads_default": 2, "device": "cpu",
                        "gpu": None},
            "family": {"params_per_model": 250_000_000, "dtype": "bfloat16", "models": 3, "bytes_per_model": 5e8},
            "memcpy_gb_per_s": {"threads_1": 20.0, "threads_default": 30.0},
            "goals": {"speedup": bm.GOALS, "merge_over_memcpy": bm.BANDWIDTH_GOAL}, "runs": runs}


def old_report() -> dict:
    e = _entry(13.7, 210.0, 11.7, 3.0)
    for side in ("ours", "mergekit"):
        del e[side]["load_before"], e[side]["load_after"]
    del e["memcpy_floor_s"], e["merge_over_memcpy"], e["memcpy_gb_per_s"], e["file_floor"], e["merge_over_file_floor"]
    e.update(fraction_of_memcpy_bandwidth=0.007, load_after=[4.0, 4, 3])
    return {"machine": {"cpus": 2, "platform": "test", "torch": "2.x", "torch_threads": 2, "load_before": [2.9, 3, 3],
                        "load_after": [4.0, 4, 3]},
            "family": {"params_per_model": 291_021_824, "dtype": "bfloat16", "models": 3, "bytes_per_model": 5.8e8},
            "memcpy_gb_per_s": {"threads_2": 28.0, "threads_1": 20.0}, "methods": {"ties": e}}


def _table(report: dict, tmp_path: Path) -> str:
    """What ``bench_merge.py --table`` prints for ``report`` (the command docgen runs)."""
    path = tmp_path / "merge.json"
    path.write_text(json.dumps(report))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_merge.py"), "--table", "--out", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_the_table_derives_from_a_report_in_the_current_format(tmp_path):
    text = _table(new_report(), tmp_path)
    rows = [r for r in text.splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert len(rows) == 3 * 2 * 2                                  # runs x dtypes x methods
    assert "| 2 | bfloat16 | ties | 10.00 | 60.00 | 6.00x (met: >= 5x) | 0.60 / 2.00 | 40.0x (goal <= 10x) " \
           "| 16.0x | 3.5 / 4.5 |" in rows
    assert "| 1 | bfloat16 | ties | 10.00 | 20.00 | 2.00x (NOT met: >= 5x) |" in text
    assert "| 3 | float32 | linear | 2.50 | 9.00 | 3.60x (met: >= 3x) |" in text
    rep = new_report()
    rep["runs"][0]["dtypes"]["bfloat16"]["ties"]["ours"]["cpu_s"] = 6.25   # CPU seconds beside the wall time
    rep["runs"][0]["dtypes"]["bfloat16"]["ties"]["mergekit"]["cpu_s"] = 31.0
    assert "| 1 | bfloat16 | ties | 10.00, 6.2 | 20.00, 31.0 | 2.00x (NOT met: >= 5x) |" in _table(rep, tmp_path)
    # the memcpy bandwidths measured before each merge (20 + load average in this report), as a range
    assert "memcpy 21.0-24.5 GB/s" in text and "old format" not in text
    assert "compiled TIES loops" not in text                       # a report without them
    rep["compiled_loops"] = {"cases": "4 pairs", "compile_empty_cache_s": 31.84, "load_from_cache_s": 3.62}
    assert "The compiled TIES loops took 31.8 s to compile with an empty cache (4 pairs; once, before anything " \
           "was timed) and take 3.6 s to load from it" in _table(rep, tmp_path)


def test_the_headline_is_the_median_run_of_each_config_dtype_bf16_first():
    figure, baseline = docgen._merge(new_report())
    assert figure == ("TIES merge of base + 2 experts (0.25 B parameters each): `dtype: bfloat16` config 10.0 s, "
                      "peak RSS 0.60 GB (median of 3 runs); `dtype: float32` config 12.0 s, peak RSS 0.60 GB "
                      "(median of 3 runs)")
    # bf16 speedups 2x, 6x, 4x: the median run is the 4x one (40 s); float32 13.3x
    assert baseline == ("mergekit: `dtype: bfloat16` 40.0 s (4.0x slower), peak RSS 2.00 GB; "
                        "`dtype: float32` 160 s (13.3x slower), peak RSS 2.00 GB")
    two = new_report()
    two["runs"] = two["runs"][:2]                                 # speedups 2x and 6x: the lower one
    assert "`dtype: bfloat16` 20.0 s (2.0x slower)" in docgen._merge(two)[1]


def test_a_run_without_mergekit_is_shown_as_not_measured(tmp_path):
    rep = new_report()
    rep["runs"] = rep["runs"][:1]
    for dt in rep["runs"][0]["dtypes"].values():
        for m, e in dt.items():
            dt[m] = {k: v for k, v in e.items() if k not in ("mergekit", "speedup_wall", "rss_ratio_ours_over_mergekit",
                                                             "outputs")}
    assert docgen._merge(rep)[1] == "mergekit: `dtype: bfloat16` not measured; `dtype: float32` not measured"
    assert "| 1 | bfloat16 | ties | 10.00 | - | - | 0.60 | 40.0x (goal <= 10x) | 16.0x | 2.5 |" in _table(rep, tmp_path)


def test_a_report_of_the_old_format_reads_as_one_float32_run(tmp_path):
    old = old_report()
    (run,) = bm.runs_of(old)
    ties = run["dtypes"]["float32"]["ties"]
    assert ties["merge_over_memcpy"] == round(11.7 / (4e9 / 20e9), 1)   # bytes moved over the 1-thread memcpy
    text = _table(old, tmp_path)
    assert "| 1 | float32 | ties | 13.70 | 210.00 | 15.33x (met: >= 5x) | 0.60 / 2.00 | 58.5x (goal <= 10x) | - " \
           "| - / - |" in text
    assert "memcpy 20.0 GB/s" in text                                    # one bandwidth, at the report's top
    assert "old format" in text and "`dtype: float32`" in text
    assert docgen._merge(old) == ("TIES merge of base + 2 experts (0.29 B parameters each): `dtype: float32` config "
                                  "13.7 s, peak RSS 0.60 GB",
                                  "mergekit: `dtype: float32` 210 s (15.3x slower), peak RSS 2.00 GB")
    with pytest.raises(ValueError, match="neither 'runs' nor 'methods'"):
        bm.runs_of({"machine": {}})


def test_the_committed_report_gives_a_table_and_a_headline(tmp_path):
    committed = json.loads((ROOT / "benchmarks" / "results" / "merge.json").read_text())
    text = _table(committed, tmp_path)
    assert text.count("| ties |") == sum("ties" in r["dtypes"].get(dt, {}) for r in bm.runs_of(committed)
                                         for dt in r["dtypes"])
    figure, baseline = docgen._merge(committed)
    assert figure.startswith("TIES merge") and baseline.startswith("mergekit: ")
    assert ("old format" in text) == ("runs" not in committed)


def test_the_table_says_whether_guest_memory_was_warmed_before_each_measurement():
    report = new_report()
    assert "without warming guest memory" in bm.markdown_table(report)
    assert "touched and freed" not in bm.markdown_table(report)
    report["pretouch_gb"] = 3.0
    table = bm.markdown_table(report)
    assert "3 GB of memory were touched and freed" in table and "without warming" not in table
    assert bm.pretouch(0) == 0.0  # --pretouch-gb 0 touches nothing
