"""`attnlab report` on run directories with hand-written metrics: the table's numbers, the notes under it, the
plots, plain run directories, the one-line errors, and the W&B report run."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from lm.report import ReportError
from lm.report.cli import add_parser, make_report
from tests.report.fakes import CONFIGS, FINAL, write_run, write_sweep

PLOTS = ("eval_loss_curves.png", "loss_vs_kv_bytes.png", "loss_vs_flops.png")


def _row(md: str, variant: str) -> list[str]:
    """The cells of `variant`'s row in the markdown table."""
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {variant} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _valid_png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"
        return im.size


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory):
    """The report of the fake sweep, written to the default place under a fresh working directory."""
    tmp = tmp_path_factory.mktemp("sweep")
    sweep = write_sweep(tmp)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        res = make_report([sweep])
    return res, tmp


def test_the_table_holds_the_means_and_paired_differences(sweep_report):
    res, tmp = sweep_report
    # The default place, under the working directory: exploratory, since 3 seeds are below the bar.
    assert res["out_dir"] == Path("experiments/results/exploratory/demo") and res["exploratory"]
    md = (tmp / res["markdown"]).read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| variant |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["variant", "params", "tokens", "KV bytes/token", "state bytes/seq", "FLOPs/token",
                       "eval_loss (mean ± std, n)", "vs softmax: mean difference (relative)", "95% t-interval",
                       "95% bootstrap", "verdict", "seeds", "spkv_density", "spkv_compression"]
    # softmax: 2.0, 2.1, 2.5 -> mean 2.2, sample std sqrt(0.14 / 2); the baseline row comes first.
    soft = _row(md, "softmax")
    assert md.index("| softmax |") < md.index("| mqa |") < md.index("| kda |")
    assert soft[6] == f"2.2000 ± {math.sqrt(0.07):.4f} (n=3)" and soft[7] == "baseline"
    assert soft[2] == "409,600" and soft[3] == "6,144" and soft[4] == "0"
    # mqa: -0.1 on every seed, 4.55% below softmax's mean, a zero-width interval; 3 seeds are below the bar;
    # density 0.9, 0.8, 0.7 and compression 1.5 as columns.
    mqa = _row(md, "mqa")
    assert mqa[6] == f"2.1000 ± {math.sqrt(0.07):.4f} (n=3)" and mqa[3] == "768"
    assert mqa[7:12] == ["-0.1000 (-4.55%)", "[-0.1000, -0.1000]", "[-0.1000, -0.1000]", "lower", "3 < 5"]
    assert mqa[12] == "0.8" and mqa[13] == "1.5"
    # kda: +0.05, -0.1, +0.1 -> mean +0.0167 ± t(0.975, 2) * sd / sqrt(3): holds 0, a tie; no KV cache, a state.
    kda = _row(md, "kda")
    kda_std = math.sqrt(sum((v - 6.65 / 3) ** 2 for v in (2.05, 2.0, 2.6)) / 2)
    assert kda[6] == f"2.2167 ± {kda_std:.4f} (n=3)"
    diffs = (0.05, -0.1, 0.1)
    half = 4.302653 * math.sqrt(sum((d - 0.05 / 3) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert kda[7] == f"+0.0167 ({100 * (0.05 / 3) / 2.2:+.2f}%)" and kda[10] == "tie"
    assert kda[8] == f"[{0.05 / 3 - half:+.4f}, {0.05 / 3 + half:+.4f}]"
    assert kda[3] == "0" and int(kda[4].replace(",", "")) > 0 and kda[12] == kda[13] == "—"
    assert "gqa4" not in [ln.split("|")[1].strip() for ln in md.splitlines() if ln.startswith("| ")]


def test_the_report_names_what_ran_and_what_did_not(sweep_report):
    res, tmp = sweep_report
    md = (tmp / res["markdown"]).read_text()
    assert "Unfinished, not in the table (2): gqa4-s0 (no eval yet, at step 50 of 100), " \
           "gqa4-s1 (not started, status pending)." in md
    assert "Command: `attnlab report " in md and "A test sweep." in md
    assert "9 finished of 11, 4 variants × seeds [0, 1, 2]" in md and "W&B group sweep-demo" in md
    assert "tokenizer bytes (256 symbols)" in md and "100 steps" in md and "norm rmsnorm" in md
    assert "Model: recipe modern, d_model 192" in md
    assert "jax " in md and "python " in md
    for name in PLOTS:
        assert f"]({name})" in md
        width, height = _valid_png(tmp / res["out_dir"] / name)
        assert width > 300 and height > 200
    data = json.loads((tmp / res["json"]).read_text())
    assert len(data["runs"]) == 9 and {u["name"] for u in data["unfinished"]} == {"gqa4-s0", "gqa4-s1"}
    mqa0 = next(r for r in data["runs"] if r["name"] == "mqa-s0")
    assert mqa0["eval_curve"] == [[50, pytest.approx(2.4)], [100, pytest.approx(1.9)]]
    assert mqa0["spkv_density"] == 0.9 and mqa0["spkv_compression"] == 1.5 and mqa0["tokens"] == 409_600
    assert mqa0["kv_cache_bytes_per_token"] == 768 and mqa0["params"] > 0 and mqa0["flops_per_token"] > 0
    assert mqa0["eval_bpb"] == 3.0 and mqa0["eval_acc"] == 0.4
    assert not (tmp / res["out_dir"] / "wandb").exists()  # auto: the runs were not online


def test_plain_run_directories(tmp_path):
    dirs = [write_run(tmp_path / "runs", v, s, f) for v, fs in {"softmax": [2.0, 2.1], "mqa": [1.9, 1.95]}.items()
            for s, f in enumerate(fs)]
    dirs.append(write_run(tmp_path / "runs", "kda", 0, 2.2, last_step=50))  # stopped at its first eval
    with pytest.raises(ReportError, match="^--out is required when no argument is a sweep directory$"):
        make_report(dirs)
    out = tmp_path / "out"
    res = make_report(dirs, out=out, wandb_mode="disabled")
    md = res["markdown"].read_text()
    assert _row(md, "mqa")[6] == "1.9250 ± 0.0354 (n=2)" and _row(md, "softmax")[7] == "baseline"
    half = 12.706205 * (0.05 / 2 ** 0.5) / 2 ** 0.5  # differences -0.1, -0.15: t(0.975, 1) * sd / sqrt(2)
    assert _row(md, "mqa")[7:11] == ["-0.1250 (-6.10%)", f"[{-0.125 - half:+.4f}, {-0.125 + half:+.4f}]",
                                     "[-0.1500, -0.1000]", "tie"]
    assert _row(md, "kda")[6] == "2.2000 (n=1)" and _row(md, "kda")[2] == "204,800"
    assert "Stopped before train.steps (their last eval is used): kda-s0 (step 50 of 100, eval at 50)." in md
    assert "plain run directories" in md and "# Report: out" in md
    # The same runs give the same PNGs.
    make_report(dirs, out=tmp_path / "again", wandb_mode="disabled")
    for name in PLOTS:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_bad_input_is_one_line(tmp_path):
    sweep = write_sweep(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "sweep.json").write_text('{"name": "x", "runs": [')
    cases = [([tmp_path / "nowhere"], {}, "no such directory"),
             ([tmp_path / "empty"], {}, "neither a sweep directory"),
             ([tmp_path / "broken"], {}, "sweep.json: not valid JSON"),
             ([sweep], {"baseline": "mha"}, "baseline 'mha' is not among the variants (softmax, mqa, kda, gqa4)"),
             ([sweep], {"key": "eval_nothing"}, "--key eval_nothing: not in the final eval of")]
    for dirs, kwargs, message in cases:
        with pytest.raises(ReportError) as e:
            make_report(dirs, out=tmp_path / "out", wandb_mode="disabled", **kwargs)
        assert isinstance(e.value, ValueError) and message in str(e.value) and "\n" not in str(e.value)


def test_the_subcommand(tmp_path, capsys):
    sweep = write_sweep(tmp_path)
    parser = argparse.ArgumentParser(prog="attnlab")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["report", str(sweep), "--out", str(tmp_path / "r"), "--baseline", "mqa",
                              "--wandb", "disabled"])
    assert args.fn(args) == 0
    printed = capsys.readouterr().out
    assert "3 variants, 9 runs, 2 unfinished" in printed and "an exploratory report" in printed
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"Command: `attnlab report {sweep} --out {tmp_path / 'r'} --baseline mqa --wandb disabled`" in md
    assert _row(md, "mqa")[7] == "baseline" and _row(md, "softmax")[7].startswith("+0.1000")


def test_offline_wandb_run_holds_the_table_and_plots(tmp_path, monkeypatch):
    from tests.lm.wandb_reader import finished_history

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    res = make_report([write_sweep(tmp_path)], out=tmp_path / "r", wandb_mode="offline")
    runs = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and res["wandb"] == str(runs[0])
    files = list(runs[0].glob("*.wandb"))
    assert files, "no offline .wandb file"
    logged = {k.split("/")[0] for row in finished_history(files[0]) for k in row}  # tables, images: nested keys
    assert {"results", "runs", "eval_loss_curves", "loss_vs_kv_bytes", "loss_vs_flops"} <= logged


@pytest.mark.slow
def test_a_trained_run_end_to_end(tmp_path):
    """Two real training steps of a tiny model, then its report: the table holds the run's own final eval."""
    import sysconfig

    from lm import data as lmdata
    from lm.config import load_config
    from lm.train import train
    from tests.lm.conftest import tiny_overrides

    txt = tmp_path / "txt"
    txt.mkdir()
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:20]:
        (txt / (p.stem + ".txt")).write_text(p.read_text(errors="replace"))
    store = lmdata.prepare([str(txt)], "byte", tmp_path / "store", log=lambda *_: None)
    res = train(load_config("configs/tiny/softmax.yaml",
                            tiny_overrides(store, tmp_path / "runs", name="softmax-s0", **{"train.steps": 2})))
    assert res.status == "finished"
    rep = make_report([res.run_dir], out=tmp_path / "out")
    row = _row(rep["markdown"].read_text(), "softmax")
    assert row[5] == f"{res.last_eval['eval_loss']:.4f} (n=1)" and row[6] == "baseline"
    assert row[2] == f"{2 * 4 * 32:,}"  # steps x batch x seq_len
    for name in PLOTS:
        _valid_png(rep["out_dir"] / name)


def test_a_run_the_manifest_calls_diverged_is_left_out(tmp_path):
    from lm.report.collect import collect

    sweep = write_sweep(tmp_path)
    manifest = json.loads((sweep / "sweep.json").read_text())
    next(r for r in manifest["runs"] if r["name"] == "kda-s2")["status"] = "diverged"
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    col = collect([sweep])
    assert len(col.records) == 8 and {"name": "kda-s2", "variant": "kda", "seed": 2, "run_dir": str(
        tmp_path / "runs" / "kda-s2"), "reason": "diverged, at step 100 of 100", "config_label": None,
        "axis_label": None} in col.unfinished


def test_a_config_baseline_pairs_within_each_override(tmp_path):
    """A sweep with an overrides axis (a, b) whose baseline is a config label: kda-a is paired with softmax-a and
    kda-b with softmax-b; the grid table has one row per config and one column per override; the PNG of the
    metric against the override is written; the manifest's metric is the default key."""
    runs = []
    for axis, shift, kda in (("a", 0.0, None), ("b", 1.0, -0.2)):
        for seed in range(3):
            soft = FINAL["softmax"][seed] + shift
            for variant, final in (("softmax", soft), ("kda", FINAL["kda"][seed] if kda is None else soft + kda)):
                runs.append((variant, axis, seed, write_run(tmp_path / "runs" / axis, variant, seed, final)))
    sweep = tmp_path / "sweeps" / "grid"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({
        "name": "grid", "group": "grid", "baseline": "softmax", "description": "", "spec": "grid.yaml",
        "seeds": [0, 1, 2], "configs": ["softmax", "kda"], "axis": ["a", "b"], "metric": "eval_loss",
        "runs": [{"name": f"{v}-{a}-s{s}", "variant": f"{v}-{a}", "seed": s, "config": CONFIGS[v][0],
                  "overrides": [], "run_dir": str(d), "status": "finished", "config_label": v, "axis_label": a}
                 for v, a, s, d in runs]}))
    res = make_report([sweep], out=tmp_path / "out")
    md = res["markdown"].read_text()
    assert "| vs softmax, same override: mean difference (relative) |" in md
    assert _row(md, "softmax-a")[7] == _row(md, "softmax-b")[7] == "baseline"
    assert _row(md, "kda-a")[10] == "tie" and _row(md, "kda-a")[7].startswith("+0.0167")
    assert _row(md, "kda-b")[7:11] == ["-0.2000 (-6.25%)", "[-0.2000, -0.2000]", "[-0.2000, -0.2000]", "lower"]
    assert "| eval_loss by config × override: mean ± std (per seed) | a | b |" in md
    kda_std = math.sqrt(sum((v - 6.65 / 3) ** 2 for v in (2.05, 2.0, 2.6)) / 2)
    assert _row(md, "kda")[1:] == [f"{sum(FINAL['kda']) / 3:.4f} ± {kda_std:.4f} (2.050, 2.000, 2.600)",
                                   f"{sum(FINAL['softmax']) / 3 + 0.8:.4f} ± {math.sqrt(0.07):.4f} (2.800, 2.900, 3.300)"]
    assert "Paired within each override" in md
    _valid_png(res["out_dir"] / "by_override.png")
    with pytest.raises(ReportError, match="or one of the configs"):
        make_report([sweep], out=tmp_path / "out", baseline="nope")
    # One config over the axis: every variant is its own override's baseline.
    doc = json.loads((sweep / "sweep.json").read_text())
    doc["configs"], doc["runs"] = ["softmax"], [r for r in doc["runs"] if r["config_label"] == "softmax"]
    (sweep / "sweep.json").write_text(json.dumps(doc))
    md = make_report([sweep], out=tmp_path / "one")["markdown"].read_text()
    assert _row(md, "softmax-a")[6] == _row(md, "softmax-b")[6] == "baseline"  # no state column without kda


def test_recipe_names_the_block_recipe():
    from lm.config import load_config
    from lm.report.tables import recipe_of

    assert recipe_of(load_config("configs/tiny/softmax.yaml")) == "modern"
    assert recipe_of(load_config("configs/paper_qkv/300m/qkv.yaml")) == "GPT-2"
    assert recipe_of(load_config("configs/tiny/softmax.yaml", ["model.norm=layernorm"])) == "custom"


def test_contrasts_pair_two_variants_seed_by_seed(tmp_path, capsys):
    """A manifest's `contrasts` and --contrast add a table: kda − mqa is +0.15, 0.0, +0.2 by seed (mean
    +0.1167, relative to mqa's mean 2.1); kda − softmax holds 0 (a tie)."""
    sweep = write_sweep(tmp_path)
    manifest = json.loads((sweep / "sweep.json").read_text())
    (sweep / "sweep.json").write_text(json.dumps({**manifest, "contrasts": [["kda", "mqa"]]}))
    parser = argparse.ArgumentParser(prog="attnlab")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["report", str(sweep), "--out", str(tmp_path / "r"), "--contrast", "kda:softmax",
                              "--wandb", "disabled"])
    assert args.fn(args) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    rows = {r[0]: r for r in (_cells(line) for line in md.splitlines()) if r and "−" in r[0]}
    assert rows["kda − mqa"][1] == "+0.1167 (+5.56%)" and rows["kda − mqa"][4:] == ["tie", "3 < 5",
                                                                                   "+0.1500, +0.0000, +0.2000"]
    assert rows["kda − softmax"][1].startswith("+0.0167") and rows["kda − softmax"][4] == "tie"
    assert "--contrast kda:softmax" in md
    data = json.loads((tmp_path / "r" / "report.json").read_text())["contrasts"]
    assert [(c["variant"], c["reference"], c["paired"]["n"]) for c in data] == [("kda", "mqa", 3), ("kda", "softmax", 3)]
    for bad, message in [("kda", "write it as VARIANT:REFERENCE"), ("kda:mha", "no finished run of 'mha'")]:
        args = parser.parse_args(["report", str(sweep), "--out", str(tmp_path / "x"), "--contrast", bad])
        with pytest.raises(ReportError, match=message):
            args.fn(args)
    # a variant of the sweep with no finished run yet (gqa4) gets a row saying so, and keeps the report exploratory
    args = parser.parse_args(["report", str(sweep), "--out", str(tmp_path / "y"), "--contrast", "gqa4:softmax",
                              "--wandb", "disabled"])
    assert args.fn(args) == 0
    md = (tmp_path / "y" / "report.md").read_text()
    rows = {r[0]: r for r in (_cells(line) for line in md.splitlines()) if r and "−" in r[0]}
    assert rows["gqa4 − softmax"][1] == "— (no finished run of gqa4 yet)" and rows["gqa4 − softmax"][5] == "0"
    data = json.loads((tmp_path / "y" / "report.json").read_text())
    assert "gqa4 vs softmax (n=0)" in data["evidence_bar"]["below"][-1]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| ") else []


def test_only_reports_part_of_a_sweep(tmp_path, monkeypatch):
    """--only keeps the matching variants, their runs and the contrasts between them, says what it left out, and
    needs a name of its own; --from-json can cut an earlier report the same way; a pattern matching nothing is a
    one-line error naming the variants."""
    import lm.report.cli as report_cli

    monkeypatch.setattr(report_cli, "RESULTS", tmp_path / "experiments" / "results")
    sweep = write_sweep(tmp_path)
    manifest = json.loads((sweep / "sweep.json").read_text())
    (sweep / "sweep.json").write_text(json.dumps({**manifest, "contrasts": [["kda", "mqa"], ["mqa", "softmax"]]}))
    parser = argparse.ArgumentParser(prog="attnlab")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["report", str(sweep), "--only", "softmax", "--only", "m*", "--wandb", "disabled"])
    with pytest.raises(ReportError, match="give it a --name"):
        args.fn(args)
    args = parser.parse_args(["report", str(sweep), "--only", "softmax", "--only", "m*", "--name", "part",
                              "--wandb", "disabled"])
    assert args.fn(args) == 0
    out = tmp_path / "experiments" / "results" / "exploratory" / "part"  # 3 seeds: below the bar
    data = json.loads((out / "report.json").read_text())
    assert {r["variant"] for r in data["runs"]} == {"softmax", "mqa"} and len(data["runs"]) == 6
    assert data["left_out"] == ["kda", "gqa4"] and data["unfinished"] == []
    assert [(c["variant"], c["reference"]) for c in data["contrasts"]] == [("mqa", "softmax")]
    md = (out / "report.md").read_text()
    assert "# Report: part" in md and "left out kda, gqa4" in md and "--only softmax --only 'm*'" in md
    assert "kda" not in md.split("## Results")[1]
    args = parser.parse_args(["report", "--from-json", str(tmp_path / "experiments/results/exploratory/part/"
                                                          "report.json"), "--only", "mqa", "--only", "softmax",
                              "--out", str(tmp_path / "again")])
    assert args.fn(args) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert len(again["runs"]) == 6 and again["left_out"] == ["kda", "gqa4"]
    args = parser.parse_args(["report", str(sweep), "--only", "lightning*", "--name", "none"])
    with pytest.raises(ReportError, match=r"no variant matches \(the variants: softmax, mqa, kda, gqa4\)"):
        args.fn(args)


def test_only_keeps_the_tuning_runs_of_the_kept_variants():
    """A tuning run's variant is the tuned variant's name and the value; --only keeps it with its variant, and
    a variant whose name extends another's is not taken for it."""
    from lm.report.collect import Collection, owner, restrict

    variants = ["share_kv", "share_kv_gqa4", "softmax"]
    assert owner("share_kv-lr0.004", variants) == "share_kv"
    assert owner("share_kv_gqa4-lr0.001", variants) == "share_kv_gqa4"
    assert owner("softmax", variants) == "softmax"
    tuning = [{"name": f"{v}-lr0.002-s0", "variant": f"{v}-lr0.002", "seed": 0} for v in variants]
    col = Collection(name="t", group=None, baseline="softmax", description="", manifests=[],
                     records=[{"variant": v, "seed": 1} for v in variants], unfinished=[], configs=[],
                     variants=variants, contrasts=[("share_kv_gqa4", "share_kv"), ("share_kv", "softmax")],
                     tuning=tuning)
    part = restrict(col, ["share_kv", "soft*"])
    assert [r["variant"] for r in part.tuning] == ["share_kv-lr0.002", "softmax-lr0.002"]
    assert [r["variant"] for r in part.records] == ["share_kv", "softmax"]
    assert part.contrasts == [("share_kv", "softmax")] and part.left_out == ["share_kv_gqa4"]


def test_a_sweep_run_short_of_its_steps_is_not_a_result(tmp_path):
    """A manifest's run that has an eval but is short of train.steps and not called finished (still training, or
    stopped and not resumed) is listed as unfinished, not compared at its half-trained eval; once the manifest
    calls it finished, it is a run stopped early, compared at its last eval and named as such."""
    import shutil

    sweep = write_sweep(tmp_path)
    shutil.rmtree(tmp_path / "runs" / "gqa4-s0")
    write_run(tmp_path / "runs", "gqa4", 0, 2.3, last_step=50)  # an eval at step 50 of 100
    manifest = json.loads((sweep / "sweep.json").read_text())
    for run in manifest["runs"]:
        if run["name"] == "gqa4-s0":
            run["status"] = "interrupted"
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    res = make_report([sweep], out=tmp_path / "r", wandb_mode="disabled")
    data = json.loads(res["json"].read_text())
    assert "gqa4" not in {r["variant"] for r in data["runs"]}
    assert {u["name"]: u["reason"] for u in data["unfinished"]}["gqa4-s0"] == \
        "interrupted, last eval at step 50 of 100"
    for run in manifest["runs"]:
        if run["name"] == "gqa4-s0":
            run["status"] = "finished"
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    res = make_report([sweep], out=tmp_path / "r2", wandb_mode="disabled")
    assert "Stopped before train.steps (their last eval is used): gqa4-s0 (step 50 of 100, eval at 50)." \
        in res["markdown"].read_text()


def test_a_store_under_the_working_directory_is_shown_relative(tmp_path, monkeypatch):
    from lm.report.tables import shown_path

    monkeypatch.chdir(tmp_path)
    assert shown_path(str(tmp_path / "data" / "stdlib-byte")) == "data/stdlib-byte"
    assert shown_path("/elsewhere/data/x") == "/elsewhere/data/x"
    assert shown_path("synthetic:mqar") == "synthetic:mqar" and shown_path("data/x") == "data/x"
