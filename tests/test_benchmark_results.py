"""The benchmarks' result tables name the machine each row ran on (rows from several machines share
one results file)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy  # noqa: E402


def _row(method, machine=None, **kw):
    row = dict(method=method, w_bits=4, a_bits=8, seed=0, top1=78.0, fp_top1=80.0, agreement=90.0, kl=0.1,
               quantize_seconds=10.0, stage_seconds={"calibrate": 10.0}, peak_mib=100.0, **kw)
    if machine is not None:
        row["machine"] = machine
    return row


def test_rows_from_other_machines_are_marked_and_the_files_own_rows_are_not():
    results = {"machine": "AMD", "imagenet": {"rows": [_row("omse"), _row("recommended", "Xeon VNNI"),
                                                         _row("+reparam+gptq", "AMD")]},
               "cifar": {"rows": [_row("omse", "Other")]}}
    marks = accuracy.machine_marks(results)
    assert marks == {"Xeon VNNI": "†", "Other": "‡"}
    lines = accuracy.table(results["imagenet"]["rows"], ["omse", "+reparam+gptq", "recommended"], marks)
    by_method = {line.split(" | ")[1]: line for line in lines[2:]}
    assert set(by_method) == {"omse", "+reparam+gptq", "recommended †"}


def test_a_file_of_one_machine_has_no_marks():
    results = {"machine": "AMD", "imagenet": {"rows": [_row("omse"), _row("recommended", "AMD")]}}
    assert accuracy.machine_marks(results) == {}


def test_data_free_rows_name_their_generator_steps_and_settings():
    assert accuracy.df_source("real", 500, {"label_smoothing": 0.3}) == "real"
    assert accuracy.df_source("clamp", 100) == "clamp"
    assert accuracy.df_source("clamp", 500) == "clamp@500"
    settings = accuracy.parse_gen_settings(["label_smoothing=0.3", "ce_weight=0.5"])
    assert settings == {"label_smoothing": 0.3, "ce_weight": 0.5}
    assert accuracy.df_source("clamp", 100, settings) == "clamp@100,ce_weight=0.5,label_smoothing=0.3"
