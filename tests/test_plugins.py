"""Plugins: a package found by its entry point (a real dist-info on the path) registers a model by name."""

import os
import subprocess
import sys

import pytest
import torch

from polytrain import plugins
from polytrain.models import MODELS, build_model

PLUGIN_MODULE = "polytrain_testplugin"
PLUGIN_SOURCE = '''
from torch import nn

from polytrain.models import MODELS


@MODELS.register("plugin_mlp")
def plugin_mlp(num_classes, in_shape, hidden=16):
    """A plugin's model: flatten, one hidden layer."""
    features = 1
    for size in in_shape:
        features *= size
    return nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
'''


def write_plugin(root, *, entry_point=True, source=PLUGIN_SOURCE):
    """A tiny installed-looking package in `root`: its module and, optionally, a dist-info with the entry point."""
    (root / f"{PLUGIN_MODULE}.py").write_text(source)
    if entry_point:
        info = root / "polytrain_testplugin-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: polytrain-testplugin\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[polytrain.plugins]\ntestplugin = {PLUGIN_MODULE}\n")
    return root


@pytest.fixture
def clean(monkeypatch):
    """No plugin loaded before the test, and nothing it registered or imported left after it."""
    monkeypatch.delenv(plugins.ENVIRONMENT_VARIABLE, raising=False)
    loaded = dict(plugins._loaded)
    plugins._loaded.clear()
    yield
    plugins._loaded.clear()
    plugins._loaded.update(loaded)
    MODELS._entries.pop("plugin_mlp", None)
    sys.modules.pop(PLUGIN_MODULE, None)


def test_an_entry_point_registers_a_model_once(clean, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path)))
    assert "plugin_mlp" not in MODELS
    assert "testplugin" in plugins.load_plugins()
    assert "plugin_mlp" in MODELS
    assert plugins.load_plugins().count("testplugin") == 1  # idempotent: no "registered twice"
    model = build_model("plugin_mlp", 10, (1, 8, 8))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_a_module_named_in_the_environment_registers_without_packaging(clean, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path, entry_point=False)))
    monkeypatch.setenv(plugins.ENVIRONMENT_VARIABLE, f" {PLUGIN_MODULE} ,")
    assert PLUGIN_MODULE in plugins.load_plugins()
    assert plugins.load_plugins().count(PLUGIN_MODULE) == 1
    assert "plugin_mlp" in MODELS


def test_a_callable_entry_point_is_called(clean, tmp_path, monkeypatch):
    source = ("from polytrain.models import MODELS\n"
              "def register():\n"
              "    MODELS.register('plugin_mlp')(lambda num_classes, in_shape: None)\n")
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path, entry_point=False, source=source)))
    monkeypatch.setenv(plugins.ENVIRONMENT_VARIABLE, f"{PLUGIN_MODULE}:register")
    plugins.load_plugins()
    plugins.load_plugins()
    assert "plugin_mlp" in MODELS


def test_a_broken_plugin_is_one_line_naming_it(clean, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path, source="import no_such_module_here\n")))
    with pytest.raises(plugins.PluginError) as raised:
        plugins.load_plugins()
    message = str(raised.value)
    assert message == (f"plugin 'testplugin' (entry point testplugin = {PLUGIN_MODULE}) failed to load: "
                       f"ModuleNotFoundError: No module named 'no_such_module_here'")
    assert isinstance(raised.value, ValueError)  # the CLI shows it in one line, exit status 2
    monkeypatch.setenv(plugins.ENVIRONMENT_VARIABLE, "not_a_module_anywhere")
    sys.modules.pop(PLUGIN_MODULE, None)
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)  # fixed: loads now, then the next one fails
    with pytest.raises(plugins.PluginError, match=r"^plugin 'not_a_module_anywhere' \(named in \$POLYTRAIN_PLUGINS\) "
                                                  r"failed to load: ModuleNotFoundError"):
        plugins.load_plugins()
    assert list(plugins._loaded) == ["testplugin"]


@pytest.mark.parametrize("how", ["entry point", "environment"])
def test_polytrain_list_shows_a_plugins_model(tmp_path, how):
    write_plugin(tmp_path, entry_point=how == "entry point")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    env.pop(plugins.ENVIRONMENT_VARIABLE, None)
    if how == "environment":
        env[plugins.ENVIRONMENT_VARIABLE] = PLUGIN_MODULE
    done = subprocess.run([sys.executable, "-m", "polytrain", "list"], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    models = next(line for line in done.stdout.splitlines() if line.startswith("models:"))
    assert "plugin_mlp" in models.split(": ", 1)[1].split(", ")
