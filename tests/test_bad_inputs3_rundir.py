"""Bad input, round three (issue 28): the run directory.

One writer at a time (an flock'd .crystal.lock: a second trainer, a resume, an --overwrite or an
export into a held directory is refused naming the holder's pid; eval, sample and watch still
read), nothing written before every check has passed (not even the directory), the step limit
applied to --epochs' resolved count, --overwrite clearing a symlinked checkpoints/, TensorBoard's
event file kept by --overwrite, a full disk reported in one line with the older checkpoint intact
and resume bitwise, and a Ctrl-C while the command is still importing.

Each refusal in the table runs against its own copy of the finished reference run of
tests/test_bad_inputs.py; every file and directory of the copy is listed and hashed before and
after, so a refused command creates no directory either.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from test_bad_inputs import R, TRAIN, reference, refused  # noqa: F401  (the module-scoped reference run)

from crystal.backends import cuda_unavailable_reason
from crystal.checkpoint import RunDir, read_config
from crystal.cli import main
from crystal.errors import CrystalError
from crystal.runlock import LOCK_FILE, RunLock

REPO = Path(__file__).resolve().parents[1]
NO_GPU = cuda_unavailable_reason() is not None
# the reference run's own command: a run with these flags is bitwise the reference run
SOLO = ["train", "--preset", "tiny", "--steps", "4", "--checkpoint-every", "2", "--spheres", "2", "--quiet"]


def tree(root: Path) -> dict:
    """Every path under root: a file's sha256, 'dir' or 'link'."""
    out = {}
    for p in sorted(root.rglob("*")):
        kind = ("link" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
                else "dir" if p.is_dir() else "other")
        out[str(p.relative_to(root))] = kind
    return out


def hold(path: Path) -> RunLock:
    """The lock of `path` taken by this (the test) process, as a trainer in it would hold it."""
    path.mkdir(parents=True, exist_ok=True)
    return RunLock.acquire(path)


def checkpoints_a_link_to_nowhere(root):
    shutil.rmtree(root / "run" / "checkpoints")
    (root / "run" / "checkpoints").symlink_to(root / "nowhere")


def checkpoints_a_file(root):
    shutil.rmtree(root / "run" / "checkpoints")
    (root / "run" / "checkpoints").write_bytes(b"x")


OVER = [*TRAIN[:-2], "--out", f"{R}/run", "--overwrite"]
CASES = {
    # the step limit applies to the steps --epochs resolves to, before anything is written
    "epochs 1e9": (None, [*TRAIN, "--epochs", "1e9"]),
    "epochs 1e300": (None, [*TRAIN, "--epochs", "1e300"]),
    "epochs 1.7e308 (steps overflow to inf)": (None, [*TRAIN, "--epochs", "1.7e308"]),
    "epochs 1e9 with --stop-at 1": (None, [*TRAIN, "--epochs", "1e9", "--stop-at", "1"]),
    "epochs 1e9 overwriting a run": (None, [*OVER, "--epochs", "1e9"]),
    # --overwrite: a checkpoints/ that is not a directory is refused, never skipped
    "overwrite, checkpoints a dangling link": (checkpoints_a_link_to_nowhere, OVER),
    "overwrite, checkpoints a file": (checkpoints_a_file, OVER),
    # a held run directory: every writer is refused naming the holder
    "second trainer into a held run": (lambda r: hold(r / "run"), [*TRAIN[:-2], "--out", f"{R}/run"]),
    "second trainer into a held empty directory": (lambda r: hold(r / "new"), TRAIN),
    "overwrite of a held run": (lambda r: hold(r / "run"), OVER),
    "resume of a held run": (lambda r: hold(r / "run"), ["train", "--resume", f"{R}/run"]),
    "export into a held directory": (lambda r: hold(r / "new"), ["export", f"{R}/run", "--out", f"{R}/new"]),
}
if NO_GPU:  # refused by the trainer itself, after the run directory used to be made
    CASES.update({
        "cuda graphs on without a GPU (device auto)": (None, [*TRAIN, "--cuda-graphs", "on"]),
        "overwrite with cuda graphs on without a GPU": (None, [*OVER, "--cuda-graphs", "on"]),
    })


@pytest.mark.parametrize("case", list(CASES))
def test_refused_exits_2_with_one_line_and_changes_no_file_or_directory(case, reference, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(reference, root, symlinks=True)
    damage, argv = CASES[case]
    held = damage(root) if damage else None  # kept alive: a RunLock holds its run while it lives
    lines = refused(root, argv, capsys, snapshot=tree)
    if isinstance(held, RunLock):
        assert f"process {os.getpid()}" in lines[0], lines[0]


# --- the lock ---------------------------------------------------------------------------------

def test_readers_read_a_held_run(reference, capsys):
    lock = hold(reference / "run")
    try:
        assert main(["eval", str(reference / "run"), "--batches", "1"]) == 0
        assert main(["sample", str(reference / "run"), "--tokens", "5"]) == 0
        from crystal.watch import run_state

        assert run_state(reference / "run")["train"]["preset"] == "tiny"
    finally:
        lock.release()


def test_a_run_releases_its_lock_when_it_ends(tmp_path, reference):
    out = tmp_path / "run"
    assert main([*SOLO, "--data", str(reference / "bytes"), "--out", str(out)]) == 0
    assert (out / LOCK_FILE).exists()  # left behind, free
    RunLock.acquire(out).release()


def test_a_writer_that_takes_the_lock_first_wins_the_first_write(tmp_path):
    run = RunDir(tmp_path / "run")  # free when checked
    lock = hold(tmp_path / "run")  # taken by another writer before this one's first write
    try:
        with pytest.raises(CrystalError, match=f"process {os.getpid()} is writing it"):
            run.log({"step": 1})
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
    finally:
        lock.release()
    RunLock.acquire(tmp_path / "run").release()  # the refused writer kept nothing


HOLDER = """
import sys
import crystal.runlock as runlock

acquire = runlock.RunLock.acquire.__func__


def acquire_and_wait(cls, run):  # the first writer, stopped with its lock held until the test says go
    lock = acquire(cls, run)
    print("locked", flush=True)
    sys.stdin.readline()
    return lock


runlock.RunLock.acquire = classmethod(acquire_and_wait)
from crystal.entry import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def contested(reference, tmp_path_factory):
    """A trainer (another process) holds --out X, stopped just after taking the lock; then a second
    trainer, a resume, an --overwrite and an export try X; then the trainer goes on to its end.
    Returns X, the holder's pid and exit status, and per contender (exit status, stderr, whether X
    changed)."""
    out = tmp_path_factory.mktemp("contested") / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *SOLO, "--data", str(reference / "bytes"),
                               "--out", str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "locked\n", holder.communicate()[1]
        contenders = {
            "second trainer": [*SOLO, "--data", str(reference / "bytes"), "--out", str(out)],
            "resume": ["train", "--resume", str(out)],
            "overwrite": [*SOLO, "--data", str(reference / "bytes"), "--out", str(out), "--overwrite"],
            "export": ["export", str(reference / "run"), "--out", str(out)],
        }
        results = {}
        for name, argv in contenders.items():  # in this process: the holder is the other one
            before, err = tree(out), io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(argv)
            results[name] = (code, err.getvalue(), tree(out) != before)
        _, err = holder.communicate("go\n", timeout=300)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    return out, holder.pid, holder.returncode, err, results


@pytest.mark.parametrize("contender", ["second trainer", "resume", "overwrite", "export"])
def test_a_writer_of_a_held_run_is_refused_naming_the_holder(contested, contender):
    _, pid, _, _, results = contested
    code, err, changed = results[contender]
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and f"is in use: process {pid} is writing it" in err, err
    assert not changed


def test_the_holders_run_is_bitwise_a_solo_run(contested, reference):
    out, _, code, err, _ = contested
    assert code == 0, err
    solo = reference / "run"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "checkpoints/latest",
                 *(str(p.relative_to(solo)) for p in (solo / "checkpoints").rglob("step-*/*"))):
        assert (out / name).read_bytes() == (solo / name).read_bytes(), name

    def steps(run):
        return [(r["step"], r.get("loss")) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert steps(out) == steps(solo)  # every step once


# --- --overwrite --------------------------------------------------------------------------------

def test_overwrite_clears_the_old_checkpoints_behind_a_symlinked_checkpoints_dir(reference, tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "big-disk" / "checkpoints"
    shutil.copytree(reference / "run", run)
    elsewhere.parent.mkdir()
    shutil.move(run / "checkpoints", elsewhere)
    (run / "checkpoints").symlink_to(elsewhere)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["latest", "step-00000002", "step-00000004"]
    assert main([*SOLO[:3], "--steps", "3", "--stop-at", "1", "--checkpoint-every", "1", "--quiet",
                 "--data", str(reference / "bytes"), "--out", str(run), "--overwrite"]) == 0
    assert (run / "checkpoints").is_symlink()  # the link is the user's: kept, its target cleared
    assert sorted(p.name for p in elsewhere.iterdir()) == ["latest", "step-00000001"]
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # steps 2 and 3, not the old run's 4
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_tensorboard_overwrite_keeps_the_new_runs_event_file(reference, tmp_path):
    run = tmp_path / "run"
    args = [*SOLO[:3], "--spheres", "2", "--quiet", "--log", "tensorboard", "--data", str(reference / "bytes"),
            "--out", str(run)]
    assert main([*args, "--steps", "2"]) == 0
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert main([*args, "--steps", "3", "--overwrite"]) == 0
    events = list(run.glob("events.out.tfevents.*"))
    assert len(events) == 1  # the new run's; the old one's went with the old run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]


# --- check first, create after -----------------------------------------------------------------

def test_tensorboard_without_tensorboardx_leaves_no_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # the import fails as if not installed
    assert main([*SOLO, "--log", "tensorboard", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --log tensorboard needs tensorboardX") and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_new_run_directory_under_a_missing_parent_is_made_at_the_first_write(tmp_path, reference):
    out = tmp_path / "a" / "b" / "run"
    assert main([*SOLO, "--steps", "1", "--checkpoint-every", "0", "--data", str(reference / "bytes"),
                 "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists()


def test_resume_of_a_finished_run_writes_its_missing_final_model_from_the_last_checkpoint(reference, tmp_path,
                                                                                          capsys):
    run = tmp_path / "run"
    shutil.copytree(reference / "run", run)
    (run / "model.safetensors").unlink()  # a final write the disk refused
    assert main(["train", "--resume", str(run)]) == 0
    assert "wrote its missing model.safetensors" in capsys.readouterr().out
    assert (run / "model.safetensors").read_bytes() == (reference / "run" / "model.safetensors").read_bytes()


# --- a full disk: a small tmpfs -----------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root and a mount-capable sandbox); skipped with the reason elsewhere."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("the full-disk tests mount a small tmpfs, which needs root")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves `leave` bytes free on disk."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(bytes(st.f_bavail * st.f_frsize - leave))
    return filler


def one_error_line(capsys) -> str:
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err + out.out
    return lines[0]


def test_a_full_disk_at_a_checkpoint_is_one_line_and_resume_is_bitwise(small_disk, reference, capsys):
    run = small_disk / "run"
    assert main([*SOLO, "--stop-at", "2", "--data", str(reference / "bytes"), "--out", str(run)]) == 0
    filler = fill(small_disk, 96 * 1024)  # room for metrics lines, not for a checkpoint's 141 KB model
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "cannot write the checkpoint of step 4" in line and "No space left on device" in line, line
    assert "checkpoint step-00000002 is intact" in line and f"--resume {run}" in line, line
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002"]  # no half-written one
    assert (ckpts / "latest").read_text() == "step-00000002\n"
    model_cfg = read_config(run / "config.json")
    assert RunDir(run, resume=True).load_state(model_cfg).step == 2  # loadable
    filler.unlink()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert (run / "model.safetensors").read_bytes() == (reference / "run" / "model.safetensors").read_bytes()
    for name in ("model.safetensors", "optim.safetensors", "state.json"):
        assert (ckpts / "step-00000004" / name).read_bytes() == \
            (reference / "run" / "checkpoints" / "step-00000004" / name).read_bytes()
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_full_disk_at_the_final_model_is_one_line(small_disk, reference, capsys):
    run = small_disk / "run"
    fill(small_disk, 64 * 1024)  # the configs and metrics fit, the 141 KB model does not
    assert main([*SOLO, "--checkpoint-every", "0", "--data", str(reference / "bytes"), "--out", str(run)]) == 2
    line = one_error_line(capsys)
    assert f"cannot write model.safetensors in {run}: No space left on device" in line, line
    assert "no checkpoint was written" in line
    assert not list(run.glob(".*.tmp"))  # the temporary file went with the failure


def test_a_full_disk_in_prepare_is_one_line(small_disk, reference, capsys):
    fill(small_disk, 16 * 1024)
    assert main(["prepare", str(reference / "input.txt"), "--out", str(small_disk / "data")]) == 2
    assert "No space left on device" in one_error_line(capsys)


# --- Ctrl-C while the command is still importing -------------------------------------------------

INTERRUPTED_IMPORT = """
import importlib, sys

class CtrlC:  # the user presses Ctrl-C while crystal.cli imports click
    def find_spec(self, name, path=None, target=None):
        if name == "click":
            raise KeyboardInterrupt

sys.meta_path.insert(0, CtrlC())
module, _, function = sys.argv[1].partition(":")
sys.exit(getattr(importlib.import_module(module), function)())
"""


def entry_point() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["crystal"]


def test_ctrl_c_during_the_entry_points_import_exits_130_with_one_line():
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT, entry_point()], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "error: interrupted\n"


def test_the_entry_point_imports_nothing_heavy():
    module = entry_point().partition(":")[0]
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith(('click', 'numpy'))))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr


def test_python_dash_m_crystal_uses_the_entry_point():
    assert "from crystal.entry import main" in (REPO / "crystal" / "__main__.py").read_text()
    assert entry_point() == "crystal.entry:main"
