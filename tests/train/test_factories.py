"""A model and a dataset of one's own by import path: the README's worked example run exactly
as written, and every way a factory can be wrong reported in one line (exit code 2) before
anything is written."""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import toy

from fastopt.train import load_config, read_metrics
from fastopt.train.cli import main


def _readme_command() -> str:
    (line,) = re.findall(r"^python -m fastopt train --config examples/\S+.*$", _readme(), re.M)
    return line.split("  #")[0].strip()


def _readme() -> str:
    return (toy.ROOT / "README.md").read_text()


def test_the_readme_example_trains_a_model_of_ones_own(tmp_path):
    """The README's command, in a copy of the checkout's examples/ and README.md (the text it
    trains on), as a process: the LSTM and its data come from examples/char_lstm.py."""
    shutil.copytree(toy.ROOT / "examples", tmp_path / "examples")
    shutil.copy(toy.ROOT / "README.md", tmp_path / "README.md")
    command = _readme_command()
    env = {**os.environ, "PYTHONPATH": str(toy.ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, *shlex.split(command)[1:], "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / shlex.split(command)[shlex.split(command).index("--out") + 1]
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["model_factory"] == "examples.char_lstm:build_model"
    assert record["config"]["model"] == {"hidden": 128, "layers": 1}  # the default filled in
    assert any(name.startswith("lstm.weight_ih_l0:") for name in record["model_signature"])
    vals = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    uniform = math.log(len(set(_readme())))  # a guess over README.md's characters
    assert len(vals) == 3 and vals[-1] < vals[0] < 0.7 * uniform, vals


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A module ``my_factories`` on sys.path with factories that go wrong in different ways."""
    (tmp_path / "my_factories.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "def data(n: int = 64, *, seed):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    x = torch.randn(n, 4, generator=g)\n"
        "    y = (x[:, 0] > 0).long()\n"
        "    return TensorDataset(x, y), TensorDataset(x, y)\n"
        "def model(width: int = 8):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, 2))\n"
        "def fails(width: int = 8):\n"
        "    raise RuntimeError('no such layer')\n"
        "def not_a_module():\n"
        "    return 'a string'\n"
        "def bad_data():\n"
        "    return 42\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


BASE = "max_steps: 4\neval_every: 2\nplots: false\ndevice: cpu\n"
OWN = "model_factory: my_factories:model\ndataset_factory: my_factories:data\n"


def test_factories_of_ones_own_train_and_get_the_seed(factories, capsys):
    path = factories / "c.yaml"
    path.write_text(BASE + OWN + "data: {n: 32, batch_size: 8}\nmodel: {width: 3}\n")
    assert main(["train", "--config", str(path), "--out", str(factories / "r")]) == 0
    record = json.loads((factories / "r" / "run.json").read_text())
    assert record["model_signature"][0] == "0.weight:(3, 4):torch.float32"
    assert record["config"]["data"] == {"batch_size": 8, "val_batch_size": 128,
                                        "num_workers": 0, "n": 32}  # fmt: skip
    # the gpt preset's data and model keys are the gpt job's: not passed to these factories
    assert load_config(path).data["batch_size"] == 8


@pytest.mark.parametrize(
    "text, message",
    [
        ("model_factory: my_factories\n",
         "config key 'model_factory' must be 'package.module:function', got 'my_factories'"),
        ("model_factory: no_such_module:f\n",
         "config key 'model_factory': cannot import 'no_such_module' (ModuleNotFoundError: "
         "No module named 'no_such_module')"),
        ("dataset_factory: my_factories:nope\n",
         "config key 'dataset_factory': 'my_factories' has no attribute 'nope'"),
        ("model_factory: my_factories:NOT_CALLABLE\n",
         "config key 'model_factory': 'my_factories:NOT_CALLABLE' is not callable"),
        (OWN + "model: {depth: 2}\n",
         "unknown config key 'model.depth' for model factory my_factories:model; valid keys: "
         "width"),
        (OWN + "model: {width: wide}\n", "config key 'model.width' must be int, got str 'wide'"),
        (OWN + "data: {seed: 3}\n", "unknown config key 'data.seed' for dataset factory"),
        ("model_factory: my_factories:fails\ndataset_factory: my_factories:data\n",
         "model factory my_factories:fails raised RuntimeError: no such layer"),
        ("model_factory: my_factories:not_a_module\ndataset_factory: my_factories:data\n",
         "model factory my_factories:not_a_module returned str, not a torch nn.Module"),
        ("model_factory: my_factories:model\ndataset_factory: my_factories:bad_data\n",
         "dataset factory my_factories:bad_data returned int: expected a JobData or a tuple"),
        ("model: {vocab_size: 7}\n",
         "config key 'model.vocab_size' is set by the data ("),
    ],
    ids=["no-colon", "no-module", "no-attribute", "not-callable", "unknown-key", "wrong-type",
         "seed-is-given", "raises", "not-a-module", "bad-data", "set-by-the-data"],
)  # fmt: skip
def test_a_wrong_factory_is_one_line(factories, capsys, text, message):
    path = factories / "bad.yaml"
    path.write_text(BASE + text)
    out = factories / "o"
    assert main(["train", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()  # nothing was started
