"""The config schema stands alone: a TrainConfig for fit() with one's own model imports no
job, while the jobs' configs (config_from_dict, load_config, run_job) check their sections."""

import subprocess
import sys

import pytest

from fastopt.train import ConfigError, TrainConfig, config_from_dict
from fastopt.train.config import parse_config
from fastopt.train.jobs import checked

JOB_MODULES = ("fastopt.train.gpt", "fastopt.train.text_data", "fastopt.train.mlp")


def test_a_train_config_imports_no_job(tmp_path):
    code = (
        "import sys\n"
        "from fastopt.train import TrainConfig, config_from_dict, fit\n"
        "TrainConfig(max_steps=5, data={'anything': 1})\n"
        f"loaded = [m for m in {JOB_MODULES!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "config_from_dict({'job': 'mlp'})\n"
        "assert 'fastopt.train.mlp' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_the_schema_alone_leaves_the_sections_to_the_jobs():
    assert parse_config({"job": "mlp", "data": {"n_train": 3}}).data == {"n_train": 3}
    with pytest.raises(ConfigError, match="unknown config key 'data.nope'"):
        checked(TrainConfig(job="mlp", data={"nope": 1}))
    filled = config_from_dict({"job": "mlp", "data": {"n_train": 3}})
    assert filled.data["n_train"] == 3 and filled.data["batch_size"] == 128
    assert checked(filled) == filled  # checking twice changes nothing


@pytest.mark.parametrize(
    "optimizer,message",
    [
        ({"state_dtype": "int4"}, "optimizer.state_dtype"),
        ({"min_8bit_size": -1}, "'optimizer.min_8bit_size' must be >= 0"),
        ({"name": "torch.optim.AdamW", "state_dtype": "int8"},
         "'optimizer.state_dtype' is a setting of fastopt.AdamW, not of torch.optim.AdamW"),
        ({"name": "torch.optim.SGD", "stochastic_rounding": True},
         "'optimizer.stochastic_rounding' is a setting of fastopt.AdamW"),
    ],
)  # fmt: skip
def test_lean_optimizer_keys_are_checked_in_one_line(optimizer, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"job": "mlp", "optimizer": optimizer})


def test_lean_optimizer_keys_reach_fastopt_adamw():
    import torch

    from fastopt.train.components import build_optimizer

    cfg = config_from_dict({"job": "mlp", "seed": 7, "optimizer": {
        "state_dtype": "int8", "min_8bit_size": 0, "stochastic_rounding": True}})  # fmt: skip
    opt = build_optimizer(cfg.optimizer, torch.nn.Linear(4, 3), cfg.seed)
    group = opt.param_groups[0]
    assert (group["state_dtype"], group["min_8bit_size"]) == ("int8", 0)
    assert (group["stochastic_rounding"], group["seed"]) == (True, 7)
    plain = build_optimizer(config_from_dict({"job": "mlp"}).optimizer, torch.nn.Linear(4, 3))
    assert "seed" not in plain.param_groups[0]  # torch's groups exactly, without a setting


def test_runs_recorded_before_the_lean_keys_keep_their_fingerprint():
    """A run folder written before optimizer.master_weights, state_dtype, min_8bit_size,
    stochastic_rounding and offload existed resumes: at their defaults they are not hashed,
    and offload (which changes no result) never is. The hashes are those 14376b9 computed,
    before the keys (a change to the jobs' presets changes them too)."""
    from fastopt.train.config import fingerprint

    assert fingerprint(config_from_dict({"job": "mlp"})) == "7d873c9f9c991dd6"
    assert fingerprint(config_from_dict({"job": "gpt"})) == "0abe8f812a85d72b"
    offloaded = config_from_dict({"job": "mlp", "optimizer": {"offload": True}})
    assert fingerprint(offloaded) == "7d873c9f9c991dd6"
    int8 = config_from_dict({"job": "mlp", "optimizer": {"state_dtype": "int8"}})
    assert fingerprint(int8) != "7d873c9f9c991dd6"


def test_offload_key_and_flag_reach_fastopt_adamw(tmp_path):
    import torch

    from fastopt.train.cli import _parser
    from fastopt.train.components import build_optimizer

    cfg = config_from_dict({"job": "mlp", "optimizer": {"offload": True}})
    assert build_optimizer(cfg.optimizer, torch.nn.Linear(4, 3)).param_groups[0]["offload"]
    args = _parser().parse_args(["train", "--offload", "--out", str(tmp_path / "run")])
    assert args.offload


def test_overlap_key_and_flag(tmp_path, capsys):
    """optimizer.overlap needs offload, is refused under fsdp2 and, changing no result, is
    not hashed; --overlap sets both keys."""
    from fastopt.train.cli import _parser, _train
    from fastopt.train.config import fingerprint

    both = {"offload": True, "overlap": True}
    assert fingerprint(config_from_dict({"job": "mlp", "optimizer": both})) == "7d873c9f9c991dd6"
    with pytest.raises(ConfigError, match="'optimizer.overlap' needs 'optimizer.offload: true'"):
        config_from_dict({"job": "mlp", "optimizer": {"overlap": True}})
    with pytest.raises(ConfigError, match="does not take parallel 'fsdp2'"):
        config_from_dict({"job": "mlp", "parallel": "fsdp2", "optimizer": both})
    args = _parser().parse_args(["train", "--job", "mlp", "--overlap", "--print-config",
                                 "--out", str(tmp_path / "run")])  # fmt: skip
    assert _train(args) == 0
    printed = capsys.readouterr().out
    assert "  offload: true\n  overlap: true\n" in printed
