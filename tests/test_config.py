import pytest

from polytrain.config import (ConfigError, Experiment, apply_overrides, load_toml, parse_assignments,
                              parse_named)


def test_overrides_are_typed():
    exp = apply_overrides(Experiment(), parse_assignments(["epochs=3", "lr=1", "model=mlp", "grad_clip=none"]))
    assert (exp.epochs, exp.lr, exp.model, exp.grad_clip) == (3, 1.0, "mlp", None)
    assert isinstance(exp.lr, float)


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown setting 'epochz'; valid: model, model_args, .*epochs"):
        apply_overrides(Experiment(), {"epochz": 3})


@pytest.mark.parametrize("item, expected", [("epochs=abc", "expected an integer"),
                                            ("lr=true", "expected a number"),
                                            ("seed=1.5", "expected an integer")])
def test_wrong_type_is_one_clear_line(item, expected):
    with pytest.raises(ConfigError, match=expected):
        apply_overrides(Experiment(), parse_assignments([item]))


def test_dotted_key_sets_one_table_entry():
    exp = apply_overrides(Experiment(model_args={"a": 1}), parse_assignments(["model_args.sr=0.25"]))
    assert exp.model_args == {"a": 1, "sr": 0.25}
    with pytest.raises(ConfigError, match="has no entries"):
        apply_overrides(Experiment(), {"epochs.x": 1})


def test_malformed_assignment():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_assignments(["epochs"])


def test_named_spec():
    assert parse_named("ring", "--strategy") == ("ring", {})
    assert parse_named("topk:ratio=0.01,ef=true", "--compressor") == ("topk", {"ratio": 0.01, "ef": True})


def test_toml_sections_group_keys_and_tables_stay_whole(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "mlp"\n[train]\nepochs = 4\nlr = 0.1\n[model_args]\nhidden = [32]\n')
    exp = apply_overrides(Experiment(), load_toml(path))
    assert (exp.model, exp.epochs, exp.lr, exp.model_args) == ("mlp", 4, 0.1, {"hidden": [32]})


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("epochs = = 3\n")
    with pytest.raises(ConfigError, match=f"invalid TOML in {path}"):
        load_toml(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_toml(tmp_path / "missing.toml")


def test_experiment_is_frozen():
    with pytest.raises(AttributeError):
        Experiment().epochs = 3
