"""``python -m fastopt``'s failures are one line, never a traceback: a run folder that is a file
or whose run.json was cut short, config files that do not decode or parse, a checkpoint that
cannot be written (disk full, file-size limit), and the smaller commands' bad input."""

import builtins
import errno
import io
import json
import os
import resource
import subprocess
import sys

import pytest
import toy

import fastopt
from fastopt.__main__ import main as fastopt_main
from fastopt.train import checkpoint as ckpt
from fastopt.train import load_checkpoint, read_metrics
from fastopt.train.cli import main


def _error_line(capsys) -> str:
    """The one line the CLI printed to stderr (and that it printed nothing more)."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


class _Killed(BaseException):
    """SIGTERM's default action, in-process: the process ends at that point."""


def test_killed_while_creating_run_json_leaves_no_empty_one(tmp_path, monkeypatch, capsys):
    """run.json was written in place: killed between creating and writing it, it stayed
    empty, --resume died with a JSONDecodeError traceback and a fresh run refused the
    folder. Written atomically, it is either complete or not there."""
    out = tmp_path / "r"
    real_open = io.open

    def open_then_die(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if str(file).endswith("run.json") and "w" in mode:  # created, nothing written yet
            f.close()
            raise _Killed
        return f

    monkeypatch.setattr(io, "open", open_then_die)  # pathlib's write_text opens with it
    monkeypatch.setattr(builtins, "open", open_then_die)
    with pytest.raises(_Killed):
        main(["train", "--config", toy.small(tmp_path, steps=20), "--out", str(out)])
    monkeypatch.undo()
    assert os.listdir(out) == []  # the temporary file went too
    assert main(["train", "--out", str(out), "--resume"]) == 2
    assert f"nothing to resume: {out} holds no run" in _error_line(capsys)
    assert main(["train", "--config", toy.small(tmp_path, steps=20), "--out", str(out)]) == 0


@pytest.mark.parametrize("content", ["", '{"fingerprint": "ab12', "[]"])
def test_an_empty_or_damaged_run_json_says_what_to_do(tmp_path, capsys, content):
    out = tmp_path / "r"
    out.mkdir()
    (out / "run.json").write_text(content)
    what = "empty" if not content else "damaged ("
    for fresh in (False, True):
        args = ["train", "--out", str(out)] + ([] if fresh else ["--resume"])
        assert main(args) == 2
        err = _error_line(capsys)
        assert f"{out / 'run.json'} is {what}" in err, err
        assert f"nothing says which run {out} holds: delete the folder" in err


def test_out_that_is_a_file_or_below_one(tmp_path, capsys):
    """mkdir raised FileExistsError / NotADirectoryError with a traceback."""
    (tmp_path / "f").write_text("x")
    for resume in ([], ["--resume"]):
        assert main(["train", "--out", str(tmp_path / "f"), *resume]) == 2
        assert f"{tmp_path / 'f'} is a file, not a folder; choose another --out" in (
            _error_line(capsys)
        )
        assert main(["train", "--out", str(tmp_path / "f" / "run"), *resume]) == 2
        assert (
            f"{tmp_path / 'f' / 'run'} cannot be a run folder: {tmp_path / 'f'} is a file"
            in _error_line(capsys)
        )


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("c.yaml", "max_steps: 10\n  seed: 2\n",
         "c.yaml' is not valid YAML: line 2, column 7: mapping values are not allowed here"),
        ("c.yaml", "schedule: [1, 2\n",
         "is not valid YAML: line 2, column 1: expected ',' or ']', but got '<stream end>' "
         "(while parsing a flow sequence at line 1, column 11)"),
        ("c.yaml", b"seed: 1 # caf\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 13)"),
        ("c.toml", b"seed = 1 # caf\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 14)"),
        ("c.toml", "seed = \n", "is not valid TOML: Invalid value (at line 1, column 8)"),
    ],
    ids=["yaml-syntax", "yaml-context", "yaml-latin1", "toml-latin1", "toml-syntax"],
)  # fmt: skip
def test_config_files_that_do_not_read_are_one_line(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_config_that_is_not_a_regular_file(tmp_path, capsys):
    """/dev/null exists: it is a character device (it said "does not exist")."""
    assert main(["train", "--config", "/dev/null"]) == 2
    assert "config file '/dev/null' is a character device, not a regular file" in (
        _error_line(capsys)
    )
    (tmp_path / "c.yaml").mkdir()
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "is a folder, not a regular file" in _error_line(capsys)


def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line(
    tmp_path, monkeypatch, capsys
):
    """Disk full at the second checkpoint: exit code 1, the path and the OS error on one
    line, the first checkpoint intact; the run resumes from it once there is room."""
    out = tmp_path / "r"
    cfg = toy.small(tmp_path, steps=60, extra="checkpoint_every: 20\nplots: false\n")
    save = ckpt.torch.save
    calls = []

    def full_disk_at_the_second(obj, f):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(obj, f)

    monkeypatch.setattr(ckpt.torch, "save", full_disk_at_the_second)
    assert main(["train", "--config", cfg, "--out", str(out), "--no-progress"]) == 1
    err = _error_line(capsys)
    path = out / "checkpoints" / "step_00000040.pt"
    assert f"error: cannot write {path}: No space left on device; the checkpoints" in err, err
    assert f"python -m fastopt train --out {out} --resume" in err
    monkeypatch.undo()
    assert sorted(os.listdir(out / "checkpoints")) == ["best.pt", "step_00000020.pt"]
    assert load_checkpoint(out / "checkpoints" / "step_00000020.pt")["step"] == 20
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert read_metrics(out)[-1]["step"] == 60


def test_a_file_size_limit_stops_the_run_in_one_line(tmp_path):
    """A real process under RLIMIT_FSIZE: run.json and the metrics fit, a checkpoint does
    not (torch.save's own error there is "unexpected pos 704 vs 598", about no file)."""
    out = tmp_path / "r"
    cfg = toy.small(tmp_path, steps=20)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))

    done = subprocess.run(
        [sys.executable, "-m", "fastopt", "train", "--config", cfg, "--out", str(out)],
        env={**os.environ, "PYTHONPATH": str(toy.ROOT), "OMP_NUM_THREADS": "1"},
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1, done.stderr
    path = out / "checkpoints" / "step_00000020.pt"
    assert done.stderr.endswith(
        f"error: cannot write {path}: File too large; the checkpoints before it are intact: "
        f"fix that, then python -m fastopt train --out {out} --resume\n"
    ), done.stderr
    assert "Traceback" not in done.stderr and os.listdir(out / "checkpoints") == []
    assert json.loads((out / "run.json").read_text())["config"]["max_steps"] == 20


def test_plot_of_a_file(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 1.0}\n')
    for path in (tmp_path / "metrics.jsonl", tmp_path / "notes.txt"):
        path.touch()
        assert main(["plot", "--out", str(path)]) == 2
        assert f"{path} is a file, not a run folder (one that holds metrics.jsonl)" in (
            _error_line(capsys)
        )


def test_info_refuses_options_and_version_prints_the_version(capsys):
    assert fastopt_main(["info", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert fastopt_main(["--version"]) == 0
    assert capsys.readouterr().out == f"fastopt {fastopt.__version__}\n"
