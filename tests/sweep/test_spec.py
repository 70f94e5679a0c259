"""Sweep specs: validation (one-line errors naming the file and the key) and expansion into runs."""
import math
from pathlib import Path

import numpy as np
import pytest

from lm.config import ConfigError, load_config, parse_yaml
from lm.sweep.local import manifest
from lm.sweep.spec import format_value, load_sweep
from tests.sweep.conftest import ROOT

GOOD = """\
name: demo
seeds: [0, 1]
common: {train.steps: 20, optim.warmup_steps: 2}
configs:
  softmax: configs/tiny/softmax.yaml
  share_kv: configs/tiny/share_kv.yaml
"""


def error_of(write_spec, text: str) -> str:
    path = write_spec(text)
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(str(path)), msg
    return msg


@pytest.mark.parametrize("text, expect", [
    (GOOD + "seedz: [3]\n", "seedz: unknown key (did you mean seeds?)"),
    (GOOD.replace("name: demo\n", ""), "name: missing"),
    (GOOD.replace("configs/tiny/share_kv.yaml", "configs/tiny/nope.yaml"),
     "configs.share_kv: config file configs/tiny/nope.yaml does not exist"),
    (GOOD + "overrides: {lr: {optim.lrr: 1.0e-3}}\n", "overrides.lr: unknown key optim.lrr (did you mean optim.lr?)"),
    (GOOD.replace("train.steps: 20", "train.stepz: 20"), "common: unknown key train.stepz (did you mean train.steps?)"),
    (GOOD.replace("share_kv: configs/tiny/share_kv.yaml",
                  "share_kv: {config: configs/tiny/share_kv.yaml, set: {optim.lr: -1}}"),
     "configs.share_kv: optim.lr: Input should be greater than 0"),
    (GOOD + "baseline: mha\n", "baseline: 'mha' is not a variant of this sweep (variants: softmax, share_kv)"),
    (GOOD + "  softmax: configs/tiny/gqa4.yaml\n", "line 7: 'softmax' is given twice; each key and label may appear once"),
    (GOOD.replace("share_kv:", "share-kv:") + "  share: configs/tiny/mqa.yaml\noverrides: {kv-x: {}, x: {}}\n",
     "configs.share x overrides.kv-x: variant label 'share-kv-x' is made twice (also by configs.share-kv)"),
    (GOOD.replace("seeds: [0, 1]", "seeds: [0, 0]"), "seeds: [0, 0] lists a seed twice"),
    (GOOD.replace("seeds: [0, 1]", "seeds: 3"), "seeds: must be a non-empty list"),
    (GOOD.replace("name: demo", "name: my sweep"), "name: 'my sweep' may only contain"),
    (GOOD + "  cont: {config: configs/tiny/softmax.yaml, init_from: mha}\n", "configs.cont.init_from: 'mha' is not a variant"),
    (GOOD + "  cont: {config: configs/tiny/softmax.yaml, init_form: softmax}\n",
     "configs.cont.init_form: unknown key (did you mean init_from?)"),
    (GOOD + "  a: {config: configs/tiny/softmax.yaml, init_from: b}\n  b: {config: configs/tiny/softmax.yaml, init_from: a}\n",
     "configs: init_from loops back: a -> b -> a"),
    (GOOD + "cluster: {slurm: {time: 24:00:00}}\n", "cluster.slurm.time: write the time limit as a quoted string"),
    (GOOD + "cluster: {slurm: {gpus_per_nod: 8}}\n", "cluster.slurm.gpus_per_nod: unknown key (did you mean gpus_per_node?)"),
    (GOOD + "cluster: {k8s: {}}\n", "cluster.k8s: unknown cluster kind"),
    (GOOD.replace("optim.warmup_steps: 2", "optim.warmup_steps: 50"),
     "common: optim.warmup_steps: 50 is larger than train.steps 20"),
    # Only the combination of a config's own overrides and the axis fails: reported under the run.
    (GOOD.replace("share_kv: configs/tiny/share_kv.yaml",
                  "share_kv: {config: configs/tiny/share_kv.yaml, set: {train.steps: 5}}")
     + "overrides: {w: {optim.warmup_steps: 10}}\n",
     "run share_kv-w-s0: optim.warmup_steps: 10 is larger than train.steps 5"),
    ("name: [unclosed\n", "line 2: not valid YAML"),
    (GOOD + "metric: eval_accuracy\n", "metric: 'eval_accuracy' is not one of eval_loss, eval_bpb, eval_ppl, eval_acc"),
    # A config label is a baseline only with an overrides axis (it then pairs within each override).
    (GOOD + "baseline: softmx\noverrides: {a: {}, b: {}}\n", "baseline: 'softmx' is not a variant of this sweep "
     "(did you mean softmax?)"),
])
def test_mistakes_are_one_line_errors_naming_file_and_key(write_spec, text, expect):
    assert expect in error_of(write_spec, text)


TUNED = "tune: {key: optim.lr, values: [1.0e-3, 2.0e-3, 4.0e-3]}\n" + GOOD


@pytest.mark.parametrize("text, expect", [
    (GOOD + "tune: {key: optim.lr, value: [1.0e-3]}\n", "tune.value: unknown key (did you mean values?)"),
    (GOOD + "tune: {key: optim.lr, values: [1.0e-3]}\n", "tune.values: must be a list of two or more values"),
    (GOOD + "tune: {key: optim.lr, values: [1.0e-3, 0.001]}\n", "tune.values: [0.001, 0.001] lists a value twice"),
    (GOOD + "tune: {key: optim, values: [1, 2]}\n", "run softmax-optim1-s0: "),
    (GOOD + "tune: {key: optim.lrr, values: [1.0e-3, 2.0e-3]}\n", "unknown key optim.lrr (did you mean optim.lr?)"),
    (GOOD + "tune: {values: [1.0e-3, 2.0e-3]}\n", "tune.key: must be a dotted config key like optim.lr"),
    (GOOD + "tune: {key: optim.lr, values: [1.0e-3, 2.0e-3], seed: -1}\n", "tune.seed: must be a whole number"),
    (TUNED + "  cont: {config: configs/tiny/softmax.yaml, init_from: softmax}\n",
     "configs.cont.init_from: a tuned sweep cannot start runs from other runs"),
    (TUNED + "  softmax-lr0.001: configs/tiny/softmax.yaml\n", "tune: the tuning variant 'softmax-lr0.001' is also a "
     "variant of the sweep"),
    (GOOD + "tune: {key: optim.lr, values: [1.0e-3, 2.0e-3], extend: -1}\n", "tune.extend: must be a whole number >= 0"),
    (GOOD + "tune: {key: optim.lr, values: [2.0e-3, 1.0e-3], extend: 1}\n",
     "tune.extend: needs increasing numbers above 0 in tune.values"),
    (GOOD + "tune: {key: optim.warmup_steps, values: [0, 2], extend: 1}\n",
     "tune.extend: needs increasing numbers above 0 in tune.values"),
])
def test_tune_mistakes_are_one_line_errors(write_spec, text, expect):
    assert expect in error_of(write_spec, text)


def test_tune_runs_the_grid_on_one_seed_then_every_seed_at_the_choice(write_spec):
    """Tuning runs are <variant>-lr<value>-s<tune seed>, variant by variant; a variant's runs for every seed come
    only with its choice, at that value; the tune seed's run is the tuning run itself."""
    from lm.sweep.spec import with_choices

    sw = load_sweep(write_spec(TUNED.replace("seeds: [0, 1]", "seeds: [0, 1, 2]")))
    assert [r.name for r in sw.runs] == [f"{v}-lr{x}-s0" for v in ("softmax", "share_kv")
                                         for x in ("0.001", "0.002", "0.004")]
    assert all(r.stage == "tune" for r in sw.runs) and sw.waiting == ("softmax", "share_kv") and sw.tune.seed == 0
    trial = sw.runs[1]
    assert trial.variant == "softmax-lr0.002" and trial.cfg.optim.lr == 0.002
    assert trial.overrides[:3] == ("train.steps=20", "optim.warmup_steps=2", "optim.lr=0.002")
    chosen = with_choices(sw, {"share_kv": 0.004})
    assert chosen.waiting == ("softmax",) and chosen.runs[:6] == sw.runs
    main = chosen.runs[6:]
    assert [(r.name, r.stage, r.reuses) for r in main] == [("share_kv-s0", "main", "share_kv-lr0.004-s0"),
                                                           ("share_kv-s1", "main", None), ("share_kv-s2", "main", None)]
    assert main[0].run_dir == "runs/sweeps/demo/share_kv-lr0.004-s0" and main[0].cfg.run.name == "share_kv-lr0.004-s0"
    assert main[2].cfg.optim.lr == 0.004 and main[2].cfg.run.seed == 2 and main[2].variant == "share_kv"
    assert "optim.lr=0.004" in main[2].overrides and main[2].run_dir == "runs/sweeps/demo/share_kv-s2"
    doc = manifest(chosen, {"share_kv-lr0.004-s0": "finished"})
    assert doc["tune"] == {"key": "optim.lr", "values": [0.001, 0.002, 0.004], "seed": 0,
                           "choices": {"share_kv": 0.004}}
    by = {r["name"]: r for r in doc["runs"]}
    assert by["softmax-lr0.001-s0"]["stage"] == "tune" and by["softmax-lr0.001-s0"]["config_label"] == "softmax"
    assert by["share_kv-s0"]["reuses"] == "share_kv-lr0.004-s0"
    assert by["softmax-s2"]["waiting"] == "tuning" and by["softmax-s2"]["overrides"] is None
    with pytest.raises(ConfigError, match="0.003 chosen for softmax is not one of the values it tried"):
        with_choices(sw, {"softmax": 0.003})
    # A tune seed outside `seeds` is a run of its own: every seed then trains at the choice.
    other = load_sweep(write_spec(TUNED.replace("4.0e-3]}", "4.0e-3], seed: 9}")))
    assert [r.reuses for r in with_choices(other, {"softmax": 0.001}).runs if r.stage == "main"] == [None, None]


def test_values_beyond_the_grid_step_at_the_grids_own_ratio_up_to_extend():
    from lm.sweep.spec import Tune

    t = Tune("optim.lr", (1e-3, 2e-3, 4e-3), 0, extend=2)
    assert t.beyond(t.values, True) == 0.008 and t.beyond((*t.values, 0.008), True) == 0.016
    assert t.beyond((*t.values, 0.008, 0.016), True) is None  # two beyond the top already
    assert t.beyond((*t.values, 0.008, 0.016), False) == 0.0005  # the other end has its own two
    assert Tune("optim.lr", (1e-4, 4.6416e-4, 2.1544e-3, 1e-2), 0, extend=1).beyond((1e-4, 4.6416e-4), False) == \
        pytest.approx(1e-4 / 4.6416)
    assert Tune("optim.lr", (1e-3, 2e-3), 0).beyond((1e-3, 2e-3), True) is None  # extend 0: never


def test_missing_spec_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^sweep spec .*nope.yaml does not exist$"):
        load_sweep(tmp_path / "nope.yaml")


def test_expansion_variants_by_seeds_names_and_override_order(write_spec):
    sw = load_sweep(write_spec("""\
        name: grid
        group: my-group
        seeds: [3, 7]
        out_dir: /tmp/sw
        common: {train: {steps: 20, eval_every: 10}, optim.warmup_steps: 2}
        configs:
          softmax: configs/tiny/softmax.yaml
          kv: {config: configs/tiny/share_kv.yaml, set: {optim.lr: 1.0e-3}}
        overrides:
          lr3e-3: {optim.lr: 3e-3}
          pat: {model.pattern: [softmax], wandb.tags: [a b, "yes"]}
        baseline: softmax-lr3e-3
        """))
    variants = ["softmax-lr3e-3", "softmax-pat", "kv-lr3e-3", "kv-pat"]
    assert [v.label for v in sw.variants] == variants
    assert [r.name for r in sw.runs] == [f"{v}-s{s}" for s in (3, 7) for v in variants]
    assert sw.group == "my-group" and sw.baseline == "softmax-lr3e-3" and sw.seeds == (3, 7)
    run = next(r for r in sw.runs if r.name == "kv-lr3e-3-s7")
    assert run.overrides == ("train.steps=20", "train.eval_every=10", "optim.warmup_steps=2", "optim.lr=0.001",
                             "optim.lr=0.003", "run.name=kv-lr3e-3-s7", "run.out_dir=/tmp/sw/grid", "run.seed=7",
                             "wandb.group=my-group")
    assert run.run_dir == "/tmp/sw/grid/kv-lr3e-3-s7" and run.variant == "kv-lr3e-3" and run.seed == 7
    assert run.config == "configs/tiny/share_kv.yaml"
    assert run.cfg.optim.lr == 3e-3 and run.cfg.run.seed == 7 and run.cfg.wandb.group == "my-group"
    assert run.cfg.model.mixers["softmax"].share == "kv"
    # What each run trains is exactly load_config of its config and overrides (what `attnlab train` gets).
    assert load_config(run.config, list(run.overrides)).to_dict() == run.cfg.to_dict()
    pat = next(r for r in sw.runs if r.name == "softmax-pat-s3")
    assert pat.cfg.wandb.tags == ["a b", "yes"] and pat.cfg.model.pattern == ["softmax"]


def test_defaults(write_spec):
    sw = load_sweep(write_spec(GOOD))
    assert (sw.name, sw.group, sw.baseline, sw.out_dir, sw.description) == ("demo", "demo", "softmax", "runs/sweeps", "")
    assert sw.manifest_path == Path("runs/sweeps/demo/sweep.json")
    assert [r.name for r in sw.runs] == ["softmax-s0", "share_kv-s0", "softmax-s1", "share_kv-s1"]


def test_init_from_sources_come_first_and_follow_the_override(write_spec):
    sw = load_sweep(write_spec("""\
        name: adapt
        seeds: [0, 1]
        common: {train.steps: 20, optim.warmup_steps: 2}
        baseline: base-a
        configs:
          cont: {config: configs/tiny/share_kv.yaml, init_from: base}
          base: configs/tiny/softmax.yaml
          pinned: {config: configs/tiny/softmax.yaml, init_from: base-b}
        overrides: {a: {}, b: {optim.lr: 1.0e-3}}
        """))
    names = [r.name for r in sw.runs]
    assert names[:6] == ["base-a-s0", "cont-a-s0", "base-b-s0", "cont-b-s0", "pinned-a-s0", "pinned-b-s0"]
    by = {r.name: r for r in sw.runs}
    assert by["cont-b-s1"].init_from == "runs/sweeps/adapt/base-b-s1" and by["cont-b-s1"].init_from_run == "base-b-s1"
    assert by["pinned-a-s1"].init_from_run == "base-b-s1"
    assert by["base-a-s0"].init_from is None
    assert by["cont-a-s0"].argv()[-2:] == ["--init-from", "runs/sweeps/adapt/base-a-s0"]


@pytest.mark.parametrize("value", [0.003, 1e-5, 3, True, False, None, "cosine", "3e-3", "true", "a b", "", "x: y",
                                   [1, "kda", 2.5], {"a": [1]}, float("inf"), -2])
def test_values_round_trip_through_set_text(value):
    assert parse_yaml(format_value(value)) == value or (value == "" and format_value(value) == '""')
    assert format_value(float("nan")) == ".nan" and math.isnan(parse_yaml(".nan"))


def test_committed_specs_load_with_three_seeds_or_more():
    specs = sorted((ROOT / "experiments/sweeps").glob("*.yaml"))
    assert {p.stem for p in specs} >= {"projection_sharing_tiny", "projection_sharing_300m", "projection_sharing_1.2b",
                                       "tiny_softmax_family", "tiny_spkv", "tiny_linear_family", "tiny_conv_controls",
                                       "mqar"}
    # Specs naming a config that an experiment writes first (a design from trained runs) load once it exists.
    written_first = {"design_hybrid_heads": "configs/tiny/hybrid2048_heads.yaml"}
    for p in specs:
        if p.stem in written_first and not (ROOT / written_first[p.stem]).is_file():
            with pytest.raises(ConfigError, match=f"config file {written_first[p.stem]} does not exist"):
                load_sweep(p.relative_to(ROOT))
            continue
        sw = load_sweep(p.relative_to(ROOT))
        assert len(sw.seeds) >= 3 and sw.name == p.stem, p


def test_paper_grids_are_the_config_directories():
    sw300 = load_sweep("experiments/sweeps/projection_sharing_300m.yaml")
    assert {v.config for v in sw300.variants} == {
        f"configs/paper_qkv/300m/{p.name}" for p in (ROOT / "configs/paper_qkv/300m").glob("*.yaml")
        if not p.name.startswith("_")}
    sw12 = load_sweep("experiments/sweeps/projection_sharing_1.2b.yaml")
    # The variants the paper trained at 1.2B (not Q=K-V, Q=K=V; no MQA result).
    assert {v.label for v in sw12.variants} == {"qkv", "share_kv", "gqa8", "share_kv_gqa8", "share_kv_mqa"}
    assert sw300.baseline == sw12.baseline == "qkv"
    tiny = load_sweep("experiments/sweeps/projection_sharing_tiny.yaml")
    assert {v.label for v in tiny.variants} == {"softmax", "share_kv", "share_qk", "share_qkv", "gqa4",
                                                "share_kv_gqa4", "mqa", "share_kv_mqa"}


def test_ablation_specs_hold_the_reported_configs_and_budgets():
    """The tiny ablation specs train the configs and budget their results (experiments/results/<name>/) report."""

    def configs(name):
        sw = load_sweep(f"experiments/sweeps/{name}.yaml")
        return sw, {v.label: v.config for v in sw.variants}

    tiny = lambda *names: {n: f"configs/tiny/{n}.yaml" for n in names}  # noqa: E731
    family = tiny("softmax", "gqa4", "mqa", "share_kv", "share_kv_gqa4", "share_qk", "share_kv_mqa", "share_qkv",
                  "cca", "ccgqa", "spkv", "spkv_cca")
    for name, expect in [("tiny_conv_controls", tiny("softmax", "softmax_conv", "cca", "cca_noconv", "kda",
                                                    "kda_matched")),
                         ("tiny_linear_family", tiny("softmax", "kda", "lightning", "kimi_hybrid", "minimax_hybrid")),
                         ("tiny_softmax_family", family)]:
        sw, got = configs(name)
        assert got == expect, name
        assert sw.seeds == (0, 1, 2) and sw.baseline == "softmax" and sw.contrasts, name
        for r in sw.runs:
            c = r.cfg
            assert (c.train.steps, c.optim.warmup_steps, c.train.ckpt_every, c.train.log_every, c.wandb.mode) == \
                (100, 10, 0, 50, "disabled"), r.name
    sw, got = configs("mqar")
    models = ("softmax", "kda", "lightning", "kimi_hybrid", "minimax_hybrid", "softmax_conv")
    assert got == ({f"{m}-p{n}": f"configs/mqar/{m}.yaml" for m in models for n in (4, 8, 16)}
                   | {f"softmax_lr1e-3-p{n}": "configs/mqar/softmax.yaml" for n in (4, 8, 16)})
    assert (sw.baseline, sw.metric, sw.axis, len(sw.runs)) == ("softmax", "eval_acc", ("p4", "p8", "p16"), 63)
    assert all(r.cfg.train.steps == 600 and r.cfg.data.seq_len == 64 and r.cfg.model.vocab_size == 128
               and r.cfg.data.batch_size == 64
               and r.cfg.data.task["n_pairs"] == int(r.variant.rsplit("-p", 1)[1]) for r in sw.runs)
    assert {v.label: (v.config_label, v.axis_label) for v in sw.variants}["kda-p8"] == ("kda", "p8")
    assert all(r.cfg.optim.lr == (1e-3 if r.variant.startswith("softmax_lr") else 3e-3) for r in sw.runs)
    sw, _ = configs("tiny_spkv")
    by = {r.name: r for r in sw.runs}
    assert by["spkv_adapted-s2"].init_from_run == "softmax-s2" and by["softmax_continued-s0"].init_from_run == "softmax-s0"
    anneal = by["spkv_reg-s0"].cfg.model.mixers["softmax"].spkv
    assert (anneal.anneal.freeze_steps, anneal.anneal.ramp_steps, anneal.density_reg) == (25, 10, 0.05)


def test_the_2m_token_tiny_sweep_tunes_the_lr_per_variant_over_five_seeds():
    """tiny_2m: >= 2M tokens per run, lr from a 3-point grid on seed 0, then seeds 1-5 (the tuning seed is not
    reported); evals at half and end; every contrast names two of its variants; the all-local control has SP-KV's
    window; the value-shift control."""
    sw = load_sweep("experiments/sweeps/tiny_2m.yaml")
    assert sw.seeds == (1, 2, 3, 4, 5) and sw.tune.seed == 0 and sw.tune.values == (1e-3, 2e-3, 4e-3)
    assert sw.tune.key == "optim.lr"
    assert sw.tune.extend == 2  # a best lr at an end of the grid goes on past it
    assert len(sw.variants) == 16 and len(sw.runs) == 48 and all(r.stage == "tune" for r in sw.runs)
    for r in sw.runs:
        c = r.cfg
        assert c.train.steps * c.data.batch_size * c.data.seq_len >= 2_000_000, r.name
        assert (c.train.eval_every, c.train.steps) == (250, 500), r.name
    by = {r.variant: r.cfg for r in sw.runs}
    spkv = by["spkv-lr0.002"].model.mixers["softmax"].spkv
    assert (spkv.density_reg, spkv.lr_mult, spkv.anneal.freeze_steps) == (0.0, 5.0, 125)
    assert by["local32-lr0.002"].model.mixers["softmax"].sliding_window == spkv.window == 32
    assert ("spkv", "local32") in sw.contrasts and ("cca_latent", "softmax_qknorm") in sw.contrasts
    assert ("softmax_vshift", "softmax") in sw.contrasts
    assert by["softmax_vshift-lr0.002"].model.mixers["softmax"].value_shift
    assert not by["softmax-lr0.002"].model.mixers["softmax"].value_shift


def test_a_config_label_baseline_pairs_within_the_axis(write_spec):
    sw = load_sweep(write_spec(GOOD + "baseline: softmax\nmetric: eval_acc\noverrides: {a: {}, b: {optim.lr: 1.0e-3}}\n"))
    assert (sw.baseline, sw.metric, sw.configs, sw.axis) == ("softmax", "eval_acc", ("softmax", "share_kv"), ("a", "b"))
    assert [(v.label, v.config_label, v.axis_label) for v in sw.variants][:2] == [("softmax-a", "softmax", "a"),
                                                                                 ("softmax-b", "softmax", "b")]


def test_contrasts_name_pairs_of_variants(write_spec):
    sw = load_sweep(write_spec(GOOD + "contrasts: [[share_kv, softmax]]\n"))
    assert sw.contrasts == (("share_kv", "softmax"),)
    assert manifest(sw)["contrasts"] == [["share_kv", "softmax"]]
    assert load_sweep(write_spec(GOOD)).contrasts == ()
    for text, message in [("contrasts: share_kv", "must be a list of [variant, reference] pairs"),
                          ("contrasts: [[share_kv]]", "is not a [variant, reference] pair"),
                          ("contrasts: [[share_qv, softmax]]", "'share_qv' is not a variant of this sweep (did you mean share_kv?)"),
                          ("contrasts: [[softmax, softmax]]", "compares a variant with itself")]:
        assert message in error_of(write_spec, GOOD + text + "\n")


def test_the_zoology_figure_2_sweep():
    """Zoology's 3 settings x 4 widths, its 4-point lr grid per variant on seed 0, then 5 other seeds, accuracy."""
    sw = load_sweep("experiments/sweeps/mqar_zoology_fig2.yaml")
    assert (sw.metric, sw.seeds, len(sw.variants), len(sw.runs)) == ("eval_acc", (1, 2, 3, 4, 5), 12, 48)
    assert [round(x, 6) for x in sw.tune.values] == [round(x, 6) for x in np.logspace(-4, -2, 4)]
    for r in sw.runs:
        c = r.cfg
        assert (c.model.vocab_size, c.data.task["vocab_size"], c.model.mixers["softmax"].n_heads, c.model.mlp.kind,
                c.model.pos, c.data.task["power_a"], c.data.task["noise"]) == (8192, 8192, 1, "identity", "learned",
                                                                               0.01, False), r.name
        setting = {64: (4, 512, 12500), 128: (8, 512, 12500), 256: (16, 256, 25000)}[c.data.seq_len]
        assert (c.data.task["n_pairs"], c.data.batch_size, c.train.steps) == setting, r.name
        assert c.model.max_seq_len == c.data.seq_len


def test_the_long_context_spkv_sweep_puts_pairs_anywhere():
    """long_spkv_random: pairs at random positions in every stage, SP-KV by the next-token loss alone with the
    paper's predictor settings, the continued runs without warmup, 5 seeds."""
    sw = load_sweep("experiments/sweeps/long_spkv_random.yaml")
    assert sw.seeds == (0, 1, 2, 3, 4) and sw.metric == "eval_acc" and sw.baseline == "dense"
    by = {r.name: r.cfg for r in sw.runs}
    assert all(c.data.task["layout"] == "random" for c in by.values())
    spkv = by["spkv-s0"].model.mixers["softmax"].spkv
    assert (spkv.density_reg, spkv.lr_mult, spkv.init_bias, spkv.threshold) == (0.0, 5.0, 5.0, 0.5)
    assert by["spkv-s0"].data.seq_len == by["dense-s0"].data.seq_len == 2048
    assert by["spkv-s0"].optim.warmup_steps == by["dense-s0"].optim.warmup_steps == 0
    assert {r.name: r.init_from_run for r in sw.runs}["spkv-s3"] == "short-s3"


def test_the_gpt2_recipe_grid_is_tiny_2m_grid_on_gpt2_blocks():
    from lm.report.tables import recipe_of

    gpt2, modern = load_sweep("experiments/sweeps/tiny_2m_gpt2.yaml"), load_sweep("experiments/sweeps/tiny_2m.yaml")
    assert [v.label for v in gpt2.variants] == [v.label for v in modern.variants][:8]
    assert (gpt2.tune, gpt2.seeds) == (modern.tune, modern.seeds)
    for r in gpt2.runs:
        c = r.cfg
        assert recipe_of(c) == "GPT-2" and c.model.bias and not c.model.depth_scaled_init, r.name
        assert c.train.steps * c.data.batch_size * c.data.seq_len >= 2_000_000 and c.optim.wd_mask == "all"


def test_the_text_spkv_sweep_at_2048_tokens():
    sw = load_sweep("experiments/sweeps/text_spkv_2048.yaml")
    by = {r.variant: r.cfg for r in sw.runs}
    spkv = by["spkv-lr0.002"].model.mixers["softmax"].spkv
    assert (spkv.window, spkv.density_reg, spkv.lr_mult, spkv.anneal.freeze_steps) == (128, 0.0, 5.0, 125)
    assert by["local128-lr0.002"].model.mixers["softmax"].sliding_window == 128
    assert all(c.data.seq_len == 2048 and c.train.steps * c.data.batch_size * 2048 >= 2_000_000 for c in by.values())
    assert sw.seeds == (1, 2, 3, 4, 5) and sw.tune.seed == 0 and ("spkv", "local128") in sw.contrasts


EVALS = GOOD + "evals: {kv_h2o: {of: share_kv, cache_policy: h2o, cache_budget: 8}}\n"


@pytest.mark.parametrize("text, expect", [
    (GOOD + "evals: {x: {of: mha}}\n", "evals.x.of: 'mha' is not a variant of this sweep"),
    (GOOD + "evals: {x: {of: softmax, cache_policy: lru}}\n", "evals.x.cache_policy: 'lru' is not one of spkv"),
    (GOOD + "evals: {x: {of: softmax, cache_budget: 8}}\n", "evals.x.cache_budget: applies with cache_policy"),
    (GOOD + "evals: {x: {of: softmax, cache_policy: h2o, cache_budget: 0}}\n", "evals.x.cache_budget: a positive"),
    (GOOD + "evals: {x: {of: softmax, set: {model.mixers.softmax.spkv.treshold: 0.7}}}\n", "evals.x.set: "),
    (GOOD + "evals: {softmax: {of: share_kv}}\n", "evals.softmax: 'softmax' is also a variant"),
    (GOOD + "evals: {x: {oof: softmax}}\n", "evals.x.oof: unknown key (did you mean of?)"),
])
def test_eval_variant_mistakes_are_one_line_errors(write_spec, text, expect):
    assert expect in error_of(write_spec, text)


def test_eval_variants_name_a_trained_variant_and_join_contrasts(write_spec):
    sw = load_sweep(write_spec(EVALS + "contrasts: [[kv_h2o, share_kv]]\n"))
    (e,) = sw.evals
    assert (e.label, e.of, e.cache_policy, e.cache_budget, e.overrides) == ("kv_h2o", "share_kv", "h2o", 8, ())
    assert sw.contrasts == (("kv_h2o", "share_kv"),) and len(sw.runs) == 4  # nothing more to train
    doc = manifest(sw)
    assert [(x["name"], x["of"]) for x in doc["evals"]] == [("kv_h2o-s0", "share_kv-s0"), ("kv_h2o-s1", "share_kv-s1")]
    assert doc["evals"][0]["result"] == "runs/sweeps/demo/evals/kv_h2o-s0.json"


def test_the_long_context_spkv_sweep_compares_cache_policies_at_one_budget():
    sw = load_sweep("experiments/sweeps/long_spkv_random.yaml")
    by = {e.label: e for e in sw.evals}
    assert {by[k].cache_budget for k in ("spkv_cache72", "dense_sink72", "dense_h2o72", "dense_random72")} == {72}
    assert (by["dense_h2o72"].of, by["dense_h2o72"].cache_policy, by["spkv_cache72"].cache_policy) == ("dense", "h2o",
                                                                                                     "spkv")
    assert by["spkv_tau07"].overrides == ("model.mixers.softmax.spkv.threshold=0.7",)
    assert ("spkv_cache72", "dense_h2o72") in sw.contrasts


def test_the_zoology_model_ranking_shares_figure_2s_setup():
    """Every model of mqar_zoology_models is attention.yaml's task, blocks and training with another mixer."""
    sw = load_sweep("experiments/sweeps/mqar_zoology_models.yaml")
    fig2 = {r.variant.split("-lr")[0]: r.cfg for r in load_sweep("experiments/sweeps/mqar_zoology_fig2.yaml").runs}
    assert sw.tune == load_sweep("experiments/sweeps/mqar_zoology_fig2.yaml").tune and sw.metric == "eval_acc"
    for r in sw.runs:
        c, ref = r.cfg, fig2["attention_d128-" + r.variant.split("-")[1]]
        assert c.model.d_model == 128 and c.model.mlp.kind == "identity", r.name
        assert (c.data.model_dump(), c.optim.model_dump(exclude={"lr"}), c.train.steps) == (
            ref.data.model_dump(), ref.optim.model_dump(exclude={"lr"}), ref.train.steps), r.name
