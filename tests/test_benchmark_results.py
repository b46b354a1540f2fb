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


def _seg_row(method, sha, fp=57.1473, quant=56.0, num_eval=233, machine="Xeon"):
    return dict(method=method, bits="w8a8", data_free=None, num_calib=32, model_sha=sha, fp_miou=fp,
                quant_miou=quant, num_eval=num_eval, machine=machine)


def test_segmentation_rows_of_another_build_count_only_with_the_same_float_miou(tmp_path):
    import json

    import segmentation

    (tmp_path / "model.json").write_text(json.dumps({"metrics": {"test_miou": 57.147}}))
    same = segmentation._same_model(tmp_path / "model.pth", "aaaa", num_test=233)
    assert same(_seg_row("omse", "aaaa", fp=50.0))  # these very weights
    assert same(_seg_row("omse", "bbbb", fp=57.1473))  # another build, the same float mIoU
    assert not same(_seg_row("omse", "bbbb", fp=57.38))  # another model
    assert not same(_seg_row("omse", "bbbb", num_eval=120))  # scored on other images: not comparable
    assert not same(_seg_row("omse", None))  # from before rows recorded the checksum
    (tmp_path / "model.json").unlink()  # no card: only the same weights count
    assert not segmentation._same_model(tmp_path / "model.pth", "aaaa", 233)(_seg_row("omse", "bbbb"))


def test_segmentation_table_marks_rows_of_another_build_and_compares_the_rows_of_both():
    import segmentation

    here = _seg_row("omse", "aaaa", fp=57.1472, quant=56.35, machine="AMD")
    there = _seg_row("recommended", "bbbb", quant=57.07)
    extra = {"model_sha": "aaaa", "other_build_rows": [_seg_row("omse", "bbbb", quant=56.32)]}
    assert segmentation._build_lines([here], extra) == []
    (line,) = segmentation._build_lines([here, there], extra)[1:]
    assert line.startswith("‡ 1 rows ran on another build") and "checksum bbbb" in line and "on Xeon" in line
    assert "57.1473 against 57.1472" in line and "omse W8A8 56.32 there, 56.35 here" in line


def test_segmentation_rows_of_two_other_builds_get_marks_of_their_own():
    import segmentation

    rows = [_seg_row("omse", "aaaa"), _seg_row("recommended", "bbbb"), _seg_row("mptq-vit", "cccc")]
    assert segmentation._build_marks(rows, {"model_sha": "aaaa"}) == {"bbbb": " ‡", "cccc": " §"}
    lines = segmentation._build_lines(rows, {"model_sha": "aaaa"})[1:]
    assert [line.split(" ")[0] for line in lines] == ["‡", "§"]


def test_segmentation_data_free_rows_of_another_output_loss_or_budget_are_rows_of_their_own():
    import segmentation

    base = dict(_seg_row("recommended", "aaaa"), data_free="clamp", num_calib=16, gen_iterations=50)
    keys = {segmentation._key(base), segmentation._key(dict(base, gen_pixel_weight=1.0)),
            segmentation._key(dict(base, gen_iterations=200))}
    assert len(keys) == 3
    assert segmentation._key(dict(base, gen_pixel_weight=0.0)) == segmentation._key(base)  # 0: no pixel loss
    real = _seg_row("recommended", "aaaa")
    assert segmentation._key(dict(real, gen_pixel_weight=1.0)) == segmentation._key(real)  # real images: no generator


def test_segmentation_rows_scored_on_val_choose_settings_and_stay_out_of_the_reported_table(tmp_path, monkeypatch):
    import json

    import segmentation

    test_row = dict(_seg_row("recommended", "aaaa", quant=52.11), data_free="clamp", num_calib=16, gen_iterations=50,
                    gen_pixel_weight=1.0, pixel_agreement=93.0, kl=0.09, quantize_seconds=1552.0, peak_mib=900.0)
    val_row = dict(test_row, split="val", fp_miou=66.781, quant_miou=61.5, num_eval=101)
    assert segmentation._key(val_row) != segmentation._key(test_row)  # a val row never replaces a test row

    (tmp_path / "model.json").write_text(json.dumps({"metrics": {"test_miou": 57.147, "val_miou": 66.781}}))
    same = segmentation._same_model(tmp_path / "model.pth", "aaaa", num_test=233, num_val=101)
    assert same(dict(val_row, model_sha="bbbb"))  # another build: compared with the card's val mIoU
    assert not same(dict(val_row, model_sha="bbbb", num_eval=233))

    written = {}
    monkeypatch.setattr(segmentation, "write_section", lambda head, lines: written.setdefault(head, lines))
    monkeypatch.setattr(segmentation, "recipe_sha", lambda method: None)
    segmentation.write_results([val_row, test_row], {"model_sha": "aaaa", "num_calib": 32, "num_eval": 233,
                                                     "calibration": "32 images", "evaluation": "233 images"})
    lines = written["## Dense prediction"]
    reported = lines[lines.index(next(x for x in lines if x.startswith("| method"))):]
    reported = reported[:reported.index("")]
    assert any("| 52.11 |" in x for x in reported) and not any("61.50" in x for x in reported)
    assert any("float 57.15" in x for x in reported)  # the header's float is the test split's
    chosen = lines[lines.index(next(x for x in lines if "scored on camvid val/" in x)):]
    assert any("val mIoU (float 66.78)" in x for x in chosen) and any("| 61.50 |" in x for x in chosen)


def _peer_row(peer, bits="W8A8", machine=None, **kw):
    row = dict(model="imagenet", peer=peer, tool=peer, settings="", bits=bits, runtime="ONNX Runtime", top1=80.0,
               agreement=98.0, kl=0.01, b32_ms=500.0)
    row.update(kw)
    if machine is not None:
        row.update(machine=machine, isa="VNNI")
    return row


def test_peers_rows_from_another_machine_are_marked_and_not_timed_against_this_ones(monkeypatch):
    import peers

    written = {}
    monkeypatch.setattr(peers, "write_section", lambda heading, lines: written.setdefault("lines", lines))
    rows = [_peer_row("float", bits="FP32", tool="ONNX Runtime FP32", b32_ms=1000.0),
            _peer_row("ort-dynamic", b32_ms=800.0), _peer_row("vitq-int", b32_ms=700.0),
            _peer_row("vitq", machine="Other CPU", b32_ms=100.0)]  # faster, but on another machine
    results = {"machine": "Xeon", "isa": "VNNI", "threads": 2, "repeats": 10, "warmup": 2, "versions": {},
               "date": "2026-12-04", "commands": ["python benchmarks/peers.py"], "models": {"imagenet": {"rows": rows}}}
    peers.write_markdown(results)
    text = "\n".join(written["lines"])
    assert "rows marked †: Other CPU" in text
    assert "| vitq recommended (p1) † |" in text and "| vitq recommended-int (p1) |" in text
    speed = next(line for line in written["lines"] if "speed at batch 32" in line)
    assert "vitq recommended-int (p1) 700.0 ms" in speed and "100.0" not in speed


def test_selection_variant_measured_on_two_machines_has_a_line_for_each(monkeypatch):
    import select_recipe

    written = {}
    monkeypatch.setattr(select_recipe, "write_section", lambda heading, lines: written.setdefault("lines", lines))

    def row(fold, kl, machine):
        return {"model": "imagenet", "bits": "W6A6", "fold": fold, "variant": "recommended", "held_kl": kl,
                "held_agreement": 90.0, "seconds": 100.0, "machine": machine}

    rows = [row(0, 0.0551, "Xeon"), row(1, 0.0381, "Xeon"), row(0, 0.0443, "EPYC"), row(1, 0.0371, "EPYC")]
    select_recipe.render({"command": "python benchmarks/select_recipe.py", "machine": "Xeon", "date": "2026-12-04",
                          "rows": rows})
    lines = [line for line in written["lines"] if line.startswith("| W6A6 | recommended")]
    assert len(lines) == 2  # before, the four rows of one variant hid it from the table
    assert "0.0551 | 0.0381 | 0.0466" in lines[0] and "0.0443 | 0.0371 | 0.0407" in lines[1]
    assert "(on the first machine)" in lines[0] and "(on †)" in lines[1]


def test_selection_variant_sets_a_setting_of_one_bit_width():
    import select_recipe

    spec = select_recipe.variant("reconstruct.by_bits.w6a6.head_blocks=0,reconstruct.holdout=0.1")
    (stage,) = [st["reconstruct"] for st in spec["stages"] if isinstance(st, dict) and "reconstruct" in st]
    assert stage["by_bits"]["w6a6"]["head_blocks"] == 0 and stage["by_bits"]["w6a6"]["head_loss"] == "features"
    assert stage["holdout"] == 0.1 and stage["by_bits"]["w4a4"]["holdout"] == 0.2  # the rest as shipped


def test_selection_variants_set_or_drop_the_prefix_rows_stage():
    import select_recipe

    def prefix_stages(spec):
        return [st["prefix_rows"] for st in spec["stages"] if isinstance(st, dict) and "prefix_rows" in st]

    (shipped,) = prefix_stages(select_recipe.variant("recommended"))
    assert shipped["points"] == ["q"] and shipped["min_a_bits"] == 6
    spec = select_recipe.variant("prefix=q+act")
    assert prefix_stages(spec) == [{"points": ["q", "act"]}]  # replaces the shipped one, at every bit-width
    assert next(iter(spec["stages"][0])) == "prefix_rows"  # first: before calibration
    assert prefix_stages(select_recipe.variant("no-prefix_rows")) == []
    assert prefix_stages(select_recipe.variant("recommended,no-prefix_rows,reconstruct.lr=0.001")) == []


def test_profiles_of_two_cpu_kinds_get_files_and_sections_of_their_own(tmp_path, monkeypatch):
    import foundation
    import profile_openvino
    from vitq.export.formats import CpuInfo

    kinds = {flags: foundation.cpu_kind(CpuInfo(frozenset(flags)))
             for flags in [("avx512_vnni", "amx_int8"), ("avx512_vnni",), ("avx2",)]}
    assert [suffix for suffix, _ in kinds.values()] == ["-vnni", "-vnni-noamx", ""]
    monkeypatch.setattr(foundation, "RESULTS_MD", tmp_path / "RESULTS.md")
    for _, words in kinds.values():
        profile_openvino.render({"model": "small", "cpu_kind": words, "command": "c", "machine": "m", "isa": "i",
                                 "date": "d", "variants": {}})
    text = (tmp_path / "RESULTS.md").read_text()
    assert [text.count(f"## Where the time goes in OpenVINO on {words}: DeiT-Small") for _, words in kinds.values()] \
        == [1, 1, 1]
