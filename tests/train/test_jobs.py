"""The ``gpt`` job (the default): the standard library's sources split by file, tokenized once
and cached; the model's weight-decay groups; a short run that learns, prints the test loss and
a sample, and loads its data with worker processes to the same result."""

import math

import numpy as np
import pytest
import torch
import toy

from fastopt.train import load_config, read_metrics
from fastopt.train import text_data as T
from fastopt.train.cli import main
from fastopt.train.components import param_groups
from fastopt.train.gpt import build_model

# A few seconds: one layer, 60 steps of 16 windows of 32 characters.
TINY = """\
device: cpu
max_steps: {steps}
eval_every: 20
log_every: 10
plots: false
data: {{batch_size: 16, block_size: 32, val_windows: 64, test_windows: 64, num_workers: {workers}}}
model: {{n_layer: 1, n_embd: 64, n_head: 2}}
"""


def _tiny(tmp_path, steps=60, workers=0, extra=""):
    path = tmp_path / f"tiny{workers}.yaml"
    path.write_text(TINY.format(steps=steps, workers=workers) + extra)
    return str(path)


def _fake_stdlib(root, files):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_split_by_file_and_the_vocabulary(tmp_path, monkeypatch):
    """Each file's text is in the split its path hashes to, whole; characters seen fewer than
    MIN_CHAR_COUNT times in the training files share id 0; site-packages is left out."""
    monkeypatch.setattr(T, "MIN_CHAR_COUNT", 3)
    names = [f"pkg/mod_{i}.py" for i in range(60)]
    files = {name: f"# {name}\nx = {i}\n" for i, name in enumerate(names)}
    files["site-packages/other.py"] = "never read\n"
    files["pkg/rare.py"] = "# pkg/mod Ω\n"
    root = _fake_stdlib(tmp_path / "lib", files)
    corpus = T.load_corpus(root, tmp_path / "cache")
    assert "Ω" not in corpus.vocab and corpus.vocab[0] == T.UNKNOWN
    assert corpus.encode("Ω").tolist() == [0] and corpus.encode("x").tolist() != [0]
    splits = {s: corpus.decode(corpus.splits[s]) for s in T.SPLITS}
    assert {T.split_of(n) for n in names} == {"train", "val", "test"}  # 60 names reach all three
    seen = {n: t.replace("Ω", T.UNKNOWN) for n, t in files.items() if "site-packages" not in n}
    for name, text in seen.items():
        assert [s for s in T.SPLITS if text in splits[s]] == [T.split_of(name)], name
    assert "never read" not in "".join(splits.values())
    # each split is its files joined, in the order of their paths
    for s in T.SPLITS:
        assert splits[s] == "\n".join(seen[n] for n in sorted(seen) if T.split_of(n) == s)


def test_the_cache_is_reused_and_a_damaged_one_replaced(tmp_path, monkeypatch):
    root = _fake_stdlib(tmp_path / "lib", {f"m{i}.py": f"a = {i}\n" * 50 for i in range(30)})
    first = T.load_corpus(root, tmp_path / "cache")
    (cached,) = (tmp_path / "cache").iterdir()

    def no_reading(path):
        raise AssertionError("a file was read although the cache holds the corpus")

    monkeypatch.setattr(T, "_read", no_reading)
    second = T.load_corpus(root, tmp_path / "cache")
    assert second.vocab == first.vocab
    for s in T.SPLITS:
        assert np.array_equal(second.splits[s], first.splits[s])
    monkeypatch.undo()
    cached.write_bytes(cached.read_bytes()[:100])
    third = T.load_corpus(root, tmp_path / "cache")
    assert np.array_equal(third.splits["train"], first.splits["train"])
    assert np.load(cached)["train"].shape == first.splits["train"].shape  # rewritten whole
    (root / "m0.py").write_text("changed = True\n")  # another listing: another cache file
    T.load_corpus(root, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_windows_are_shifted_by_one():
    ids = np.arange(100, dtype=np.uint8)
    windows = T.CharWindows(ids, 8)
    assert len(windows) == (100 - 9) // 8 + 1
    x, y = windows[3]
    assert x.tolist() == list(range(24, 32)) and y.tolist() == list(range(25, 33))
    spread = T.CharWindows(ids, 8, count=5)
    assert [int(s) for s in spread.starts] == [0, 23, 46, 68, 91]  # round(91 * k / 4)
    assert spread[4][1].tolist()[-1] == 99
    with pytest.raises(ValueError, match="shorter than one window"):
        T.CharWindows(ids[:8], 8)


def test_weight_decay_goes_to_matrices_only():
    model = build_model(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
    groups = {g["name"]: g for g in param_groups(model, 0.1, matrices_only=True)}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups["decay"]["params"])
    kept = sorted(names[id(p)] for p in groups["no_decay"]["params"])
    linear = sorted(
        f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
    )
    assert decayed == linear and groups["decay"]["weight_decay"] == 0.1
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "blocks.0.ln_1.bias"} <= set(kept)
    assert all(names[id(p)].endswith("bias") or "ln" in names[id(p)] or "wte" in names[id(p)]
               or "wpe" in names[id(p)] for p in groups["no_decay"]["params"])  # fmt: skip
    assert len(decayed) + len(kept) == len(list(model.parameters()))
    (single,) = param_groups(model, 0.1, matrices_only=False)
    assert len(single["params"]) == len(list(model.parameters()))


def test_the_gpt_job_learns_and_prints_the_test_loss_and_a_sample(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", _tiny(tmp_path), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    corpus = T.load_corpus()
    uniform = math.log(len(corpus.vocab))
    vals = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < 0.75 * uniform, vals
    test_line = next(line for line in printed.splitlines() if line.startswith("test loss"))
    test_loss = float(test_line.split()[2])
    assert 0 < test_loss < 0.75 * uniform and f"(a uniform guess: {uniform:.4f})" in test_line
    sample = printed.split("sample:\n", 1)[1].split("\nwrote ", 1)[0]
    assert sample.startswith("def ") and len(sample.strip()) > 200  # 4 + 300 characters
    assert set(sample) <= set(corpus.vocab)


def test_worker_processes_load_the_same_batches(tmp_path):
    """num_workers > 0 loads in worker processes: the run is the same, loss for loss."""
    runs = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        cfg = _tiny(tmp_path, steps=20, workers=workers)
        assert main(["train", "--config", cfg, "--out", str(out), "--no-progress"]) == 0
        runs.append(
            [{k: v for k, v in r.items() if "per_sec" not in k} for r in toy.metric_rows(out)]
        )
    assert runs[0] == runs[1] and len(runs[0]) == 2


def test_bf16_autocast_runs_the_gpt_job_on_the_cpu(tmp_path):
    out = tmp_path / "bf16"
    cfg = _tiny(tmp_path, steps=40)
    assert main(["train", "--config", cfg, "--out", str(out), "--precision", "bf16"]) == 0
    vals = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    assert all(math.isfinite(v) for v in vals) and vals[-1] < vals[0]


def test_the_default_config_round_trips_and_a_resume_keeps_it(tmp_path, capsys):
    """--print-config shows the gpt preset with the factories' defaults filled in; reading it
    back gives the same config. A resumed run takes its config from run.json, not the preset
    (a larger --max-steps extends it)."""
    assert main(["train", "--print-config"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    shown = load_config(printed)
    assert shown == load_config(None)
    assert (shown.job, shown.data["block_size"], shown.model["n_layer"]) == ("gpt", 64, 3)
    assert shown.optimizer.weight_decay == 0.1 and shown.optimizer.decay_matrices_only
    out = tmp_path / "r"
    assert main(["train", "--config", _tiny(tmp_path, steps=20), "--out", str(out)]) == 0
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "30"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert "step 30: train loss" in capsys.readouterr().out
