"""The run folder: refusal, overwrite, the lock, resume, damaged files."""
import argparse
import errno
import inspect
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dfc_finetune
from models import CheckpointError
from synthetic_data import write_dfc2020
from util import process
from util.rundir import RunDir, RunFolderError, Saved

REPO = Path(__file__).resolve().parents[1]

CPU = process.Context(torch.device("cpu"))


def run_args(**flags):
    return argparse.Namespace(**{"resume": None, "overwrite": False, "seed": 0, "epochs": 2, "save_best": True,
                                 "keep_last": "full", **flags})


def open_run(path, script="test_script", **flags):
    net = torch.nn.Linear(2, 2)
    return RunDir(path, run_args(**flags), CPU, script, Saved({"state_dict": net}, torch.optim.SGD(net.parameters(), lr=0.1)))


def one_epoch(run, epoch=0):
    run.end_epoch(epoch, {"train_loss": 1.0, "samples_per_s": 1.0, "epoch_s": 1.0, "lr": 0.1})


def test_run_folder_refuses_a_run_unless_resume_or_overwrite(tmp_path):
    with open_run(tmp_path / "run", lr=0.1) as run:
        one_epoch(run)
    with pytest.raises(RunFolderError, match="holds a run .*--resume .*--overwrite"):
        open_run(tmp_path / "run", lr=0.2)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 0.1  # untouched
    open_run(tmp_path / "run", lr=0.3, overwrite=True).close()
    assert not (tmp_path / "run" / "last.pt").exists()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["lr"] == 0.3 and config["script"] == "test_script"
    assert not list((tmp_path / "run").glob("*.tmp")) and not (tmp_path / "run" / "run.lock").exists()


def test_run_lock_refuses_a_second_writer_while_the_first_lives(tmp_path):
    first = open_run(tmp_path / "run")
    with pytest.raises(RunFolderError, match=f"in use \\(pid {os.getpid()} on"):
        open_run(tmp_path / "run", resume=tmp_path / "run")
    first.close()
    open_run(tmp_path / "run", resume=tmp_path / "run").close()  # released: the next writer gets it


def dead_pid() -> int:
    """The pid of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_the_lock_of_a_killed_process_is_free_and_a_half_written_one_names_no_dead_process(tmp_path):
    """A holder that has locked but not yet written its name still holds the lock, and the file
    still names the killed run before it: the message names the live holder (the kernel's
    word), never the dead one. A killed holder (kill -9) holds nothing."""
    folder = tmp_path / "run"
    folder.mkdir()
    dead = dead_pid()
    (folder / "run.lock").write_text(f"pid {dead} on {socket.gethostname()} since 2024-01-01T00:00:00+00:00\n")
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(folder / "run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # holds the lock, has written nothing into it
        with pytest.raises(RunFolderError, match=f"in use \\(pid {holder.pid}, which has not written its name yet\\)") as error:
            open_run(folder)
        assert f"pid {dead}" not in str(error.value)
        holder.kill()
        holder.wait()
        open_run(folder).close()  # kill -9 released it: no stale lock to take over
    finally:
        holder.kill()
        holder.wait()


def test_two_live_runs_cannot_share_a_folder(tmp_path):
    folder = tmp_path / "run"
    hold = ("import sys, time; from pathlib import Path; from util.lock import RunLock; "
            "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)")
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", hold, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"in use \\(pid {holder.pid} on {socket.gethostname()} since"):
            open_run(folder)
    finally:
        holder.kill()
        holder.wait()
    open_run(folder).close()


def children(pid: int) -> list[int]:
    """The pids of the living child processes of `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the loader workers in /proc")
def test_an_immediate_resume_after_kill_9_works_while_the_killed_runs_loader_workers_live(tmp_path):
    """kill -9 of the main process (the OOM killer's way) leaves its DataLoader workers alive
    until they notice, seconds later: they are stopped here, so that they stay. A resume at once
    is not refused on their account."""
    root = write_dfc2020(tmp_path / "dfc", n_validation=8, n_test=4, seed=0, size=32)
    run = tmp_path / "run"
    argv = ["--data_root", str(root), "--arch", "resnet18", "--crop", "32", "--eval_crop", "0", "--batch_size", "4",
            "--eval_every", "0", "--device", "cpu"]
    log = open(tmp_path / "log.txt", "w")
    main = subprocess.Popen([sys.executable, str(REPO / "dfc_finetune.py"), *argv, "--epochs", "500", "--workers", "2",
                             "--save_path", str(run)], stdout=log, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers = []
    try:
        deadline = time.time() + 180
        while not (run / "last.pt").exists():  # the first epoch has ended: the second one is under way
            assert main.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()[-2000:]
            time.sleep(0.2)
        workers = children(main.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        main.kill()
        main.wait()
        assert all(Path(f"/proc/{pid}").exists() for pid in workers)
        done = torch.load(run / "last.pt", weights_only=True)["epoch"]
        results = dfc_finetune.main(["--resume", str(run), "--epochs", str(done + 1), "--workers", "0"])
        assert results["last"]["epoch"] == done + 1
    finally:
        main.kill()
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        log.close()


def test_damaged_or_foreign_checkpoints_are_named(tmp_path):
    with open_run(tmp_path / "run") as run:
        one_epoch(run)
    last = tmp_path / "run" / "last.pt"
    last.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="last.pt is not a PyTorch checkpoint"):
        open_run(tmp_path / "run", resume=tmp_path / "run")
    for seed in range(30):  # torch's unpickler fails on random bytes in many ways: each one is named
        last.write_bytes(random.Random(seed).randbytes(256))
        with pytest.raises(CheckpointError, match="last.pt is not a PyTorch checkpoint"):
            open_run(tmp_path / "run", resume=tmp_path / "run")


def test_overwrite_removes_what_the_project_wrote_and_nothing_else(tmp_path):
    folder = tmp_path / "run"
    with open_run(folder) as run:
        one_epoch(run)
    for name in ("encoder.pth", "checkpoint-epoch0.pth", "checkpoint.pth", "data_report.json"):
        (folder / name).write_bytes(b"old output")
    for sub in ("embedding", "tensorboard"):
        (folder / sub).mkdir()
        (folder / sub / "old.png").write_bytes(b"old")
    (folder / "eval").mkdir()
    (folder / "eval" / "my_notes.txt").write_text("mine")  # no code of the project writes these
    (folder / "README.txt").write_text("mine")
    open_run(folder, overwrite=True).close()
    assert sorted(p.name for p in folder.iterdir()) == ["README.txt", "config.json", "eval"]
    assert (folder / "eval" / "my_notes.txt").read_text() == "mine"


def test_a_file_as_save_path_and_damaged_config_are_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="--save_path .*file is a file, not a folder"):
        open_run(tmp_path / "file")
    with open_run(tmp_path / "run") as run:
        one_epoch(run)
    (tmp_path / "run" / "config.json").write_text('{"lr": 0.1, "epo')  # cut short
    with pytest.raises(RunFolderError, match="config.json is not valid JSON"):
        open_run(tmp_path / "run", resume=tmp_path / "run")


def test_resume_refuses_another_scripts_run(tmp_path):
    with open_run(tmp_path / "run", script="meterml_finetune") as run:
        one_epoch(run)
    with pytest.raises(RunFolderError, match="is a run of meterml_finetune, not of meterml_pretrain"):
        open_run(tmp_path / "run", script="meterml_pretrain", resume=tmp_path / "run")


def test_resume_with_fewer_epochs_is_refused_and_a_finished_run_is_left_alone(tmp_path, caplog):
    folder = tmp_path / "run"
    with open_run(folder, epochs=2) as run:
        one_epoch(run, 0)
        one_epoch(run, 1)
        run.finish({"device": "cpu"}, "test")
    results = (folder / "results.json").read_bytes()
    metrics = (folder / "metrics.jsonl").read_bytes()
    with pytest.raises(RunFolderError, match="has trained 2 epochs; --epochs 1 would not continue it"):
        open_run(folder, epochs=1, resume=folder)
    with caplog.at_level("INFO", logger="rundir"):
        with open_run(folder, epochs=2, resume=folder) as run:
            assert run.start == 2
            assert run.finish({"device": "other"}, "test") == json.loads(results)
    assert "is finished (2 epochs): nothing to do" in caplog.text
    assert (folder / "results.json").read_bytes() == results and (folder / "metrics.jsonl").read_bytes() == metrics


def test_a_record_cut_short_by_a_kill_is_dropped_with_a_message(tmp_path, caplog):
    folder = tmp_path / "run"
    with open_run(folder, epochs=3) as run:
        one_epoch(run, 0)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # killed while writing epoch 2's record
    with caplog.at_level("WARNING", logger="rundir"):
        with open_run(folder, epochs=3, resume=folder) as run:
            assert run.start == 1
            one_epoch(run, 1)
    assert "record 2 is cut short" in caplog.text
    assert [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, code):
    """Known by the write's errno, also when torch's zip writer turns the failed write into a RuntimeError."""
    assert len(inspect.signature(RunDir).parameters) <= 5
    with open_run(tmp_path / "run", epochs=3) as run:
        one_epoch(run, 0)
        before = (tmp_path / "run" / "last.pt").read_bytes()

        class FullDisk:
            def write(self, data):
                raise OSError(code, os.strerror(code))

        def full_disk(obj, f, *args, **kwargs):
            f.write(b"PK partial")
            f.file = FullDisk()
            try:
                f.write(b"the rest")
            except OSError:  # as torch's zip writer reports a failed write: no errno, no "No space" in the text
                raise RuntimeError("[enforce fail at inline_container.cc:319] . PytorchStreamWriter failed writing "
                                   "file data/0: file write failed") from None

        monkeypatch.setattr(torch, "save", full_disk)
        with pytest.raises(RunFolderError, match="no space left writing .*last.pt; the previous last.pt is intact"):
            one_epoch(run, 1)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before and not list((tmp_path / "run").glob("*.tmp"))


class Payload:
    """A pickled object that would run code when unpickled with weights_only=False."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_resume_loads_with_weights_only_and_refuses_pickled_objects(tmp_path):
    folder = tmp_path / "run"
    with open_run(folder) as run:
        one_epoch(run)
    state = torch.load(folder / "last.pt", weights_only=True)
    torch.save({**state, "payload": Payload()}, folder / "last.pt")
    with pytest.raises(CheckpointError, match="holds pickled Python objects .*which were not loaded: .*could run code"):
        open_run(folder, resume=folder)


def test_resume_refuses_non_finite_weights_naming_the_tensor(tmp_path):
    folder = tmp_path / "run"
    with open_run(folder) as run:
        one_epoch(run)
    state = torch.load(folder / "last.pt", weights_only=True)
    state["state_dict"]["weight"][0, 0] = float("nan")
    torch.save(state, folder / "last.pt")
    with pytest.raises(RunFolderError, match="non-finite values .* in state_dict.weight"):
        open_run(folder, resume=folder)


def test_keep_last_weights_shrinks_last_pt_once_finished(tmp_path):
    folder = tmp_path / "run"
    with open_run(folder, epochs=1, keep_last="weights") as run:
        one_epoch(run, 0)
        assert "optimizer" in torch.load(folder / "last.pt", weights_only=True)  # resumable while it runs
        run.finish({"device": "cpu"}, "test")
    assert "optimizer" not in torch.load(folder / "last.pt", weights_only=True)
    with pytest.raises(RunFolderError, match="holds the weights only .*cannot be extended"):
        open_run(folder, epochs=2, resume=folder)


def test_no_resume_hint_without_a_checkpoint_and_absolute_paths_in_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    open_run(Path("run"), data_root="data", model_path="weights.pth", save_path=Path("run")).close()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["data_root"], config["model_path"], config["save_path"]) == (
        str(tmp_path / "data"), str(tmp_path / "weights.pth"), str(tmp_path / "run"))  # tools work from any folder
    with pytest.raises(RunFolderError) as error:  # killed before its first epoch ended: nothing to resume
        open_run(Path("run"))
    assert "--resume" not in str(error.value) and "--overwrite" in str(error.value)
