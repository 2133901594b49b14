"""The training view: the sphere ring, plain and quiet output, TOML configs, dry runs, plots."""

import io
import re
import subprocess
import sys

import numpy as np
import pytest
from rich.console import Console

from crystal.cli import main
from crystal.config import read_toml, resolve, to_toml
from crystal.dashboard import LiveView, Snapshot, render, ring
from crystal.model import ParamLayout


def spheres(n):
    return [{"sphere": i, "batches": 100 + i, "avg_loss": 2.0, "utilization": i / n, "tokens_per_s": 10.0}
            for i in range(n)]


def recorded(renderable, width=120) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    console.print(renderable)
    return console.export_text()


@pytest.mark.parametrize("n", [12, 5])
def test_the_ring_shows_one_marker_with_its_count_per_sphere_and_root(n):
    text = recorded(ring(spheres(n)))
    assert text.count("●") == n and "ROOT" in text
    assert all(f"●{100 + i}" in text for i in range(n))


def test_the_ring_colors_spheres_by_activity():
    console = Console(record=True, width=120, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    console.print(ring([{"sphere": 0, "batches": 1, "utilization": 0.0},
                        {"sphere": 1, "batches": 2, "utilization": 0.9}]))
    html = console.export_html()
    assert "●1" in html and "●2" in html and html.count("color:") >= 3  # root + 2 distinct spheres


def test_the_full_view_shows_progress_loss_trend_and_the_sphere_table():
    snap = Snapshot(preset="small", device="cpu", steps=100, step=40, loss=2.1, losses=[3.0, 2.5, 2.1],
                    val_loss=2.2, lr=1e-3, grad_norm=0.5, tokens_per_s=1234, ms_per_step=50, elapsed=20,
                    spheres=spheres(12))
    text = recorded(render(snap))
    assert "step 40/100" in text and "loss 2.1000" in text and "val 2.2000" in text
    assert "1,234 tok/s" in text and "ROOT" in text and "busy %" in text
    assert any(ch in text for ch in "▁▂▃▄▅▆▇█")


def test_the_live_view_renders_while_training_and_stops_cleanly():
    from crystal.trainer import train

    buf = io.StringIO()
    view = LiveView(console=Console(file=buf, force_terminal=True, width=120), refresh_per_second=20)
    model_cfg, cfg = resolve("tiny", train_overrides=dict(steps=8, spheres=5))
    try:
        train(model_cfg, cfg, on_start=view.start, on_step=view.step, on_eval=view.eval)
    finally:
        view.close()
    raw = buf.getvalue()
    out = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", raw)
    assert raw.count("\x1b[") > 0 and "ROOT" in out and "step 8/8" in out and out.count("●") >= 5


def test_piped_output_has_no_escape_codes_and_a_line_per_log_every(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "crystal", "train", "--preset", "tiny", "--steps", "9",
                           "--log-every", "3", "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stdout
    lines = [l for l in proc.stdout.splitlines() if l.startswith("step ")]
    assert [l.split()[1] for l in lines] == ["1/9", "3/9", "6/9", "9/9"]
    assert all("loss" in l and "tok/s" in l for l in lines)


def test_quiet_prints_only_the_final_summary(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--steps", "3", "--quiet", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert not [l for l in out.splitlines() if l.startswith(("step ", "crystal:", "data:", "device"))]
    assert "active spheres" in out and "saved model:" in out


def test_a_toml_config_is_overridden_by_flags(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('preset = "tiny"\n[model]\nn_layer = 3\n[train]\nlr = 1\nsteps = 7\n')
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--steps", "9", "--print-config"]) == 0
    p, m, t = read_toml_text(capsys.readouterr().out, tmp_path)
    assert p == "tiny" and m["n_layer"] == 3 and t["lr"] == 1.0 and t["steps"] == 9
    assert m["n_embd"] == 32  # the rest from the tiny preset


def read_toml_text(text, tmp_path):
    (tmp_path / "printed.toml").write_text(text)
    return read_toml(str(tmp_path / "printed.toml"))


def test_print_config_fed_back_as_config_resolves_to_the_same_config(tmp_path, capsys):
    args = ["--preset", "small", "--n-layer", "3", "--lr", "0.0007", "--min-lr", "1e-05", "--spheres", "5",
            "--eval-every", "50", "--seed", "7"]
    assert main(["train", *args, "--print-config"]) == 0
    first = capsys.readouterr().out
    (tmp_path / "resolved.toml").write_text(first)
    assert main(["train", "--config", str(tmp_path / "resolved.toml"), "--print-config"]) == 0
    assert capsys.readouterr().out == first
    preset, model, train = read_toml(str(tmp_path / "resolved.toml"))
    m, t = resolve(preset, model, train)
    assert to_toml(m, t) == first


def test_a_bad_config_file_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("[train]\nlearning_rate = 3\n")
    assert main(["train", "--config", str(tmp_path / "bad.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown setting 'learning_rate'" in err[0]


def test_dry_run_counts_the_real_parameters(capsys):
    assert main(["train", "--preset", "shakespeare-char", "--dry-run"]) == 0
    out = capsys.readouterr().out
    m, _ = resolve("shakespeare-char")
    assert f"parameters: {ParamLayout(m).n_params:,}" in out
    assert "FLOPs per token" in out and "tokens per step: 16,384" in out and "total" in out


def test_plot_writes_a_png_of_the_requested_size(tmp_path):
    mpimg = pytest.importorskip("matplotlib.image", reason="needs matplotlib (the plot extra)")
    for name in ("a", "b"):
        assert main(["train", "--preset", "tiny", "--steps", "6", "--eval-every", "3", "--spheres", "3",
                     "--quiet", "--out", str(tmp_path / name)]) == 0
    out = tmp_path / "plot.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out),
                 "--width", "900", "--height", "500"]) == 0
    img = mpimg.imread(out)
    assert img.shape[:2] == (500, 900) and np.ptp(img) > 0


def test_plot_of_a_directory_without_metrics_is_one_line_exit_2(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_info_names_blas_cores_and_gpu(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "blas:" in out and "cores:" in out and "gpu:" in out and "numba threading:" in out


def test_plot_skips_a_torn_last_metrics_line_and_writes_svg_and_pdf(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="needs matplotlib (the plot extra)")
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--steps", "3", "--spheres", "2", "--quiet", "--out", str(run)]) == 0
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 4, "loss": 5.1, "lr": 0.0')  # a run still writing its line
    for suffix, magic in ((".png", b"\x89PNG"), (".svg", b"<?xml"), (".PDF", b"%PDF")):
        assert main(["plot", str(run), "--out", str(tmp_path / f"p{suffix}")]) == 0
        assert (tmp_path / f"p{suffix}").read_bytes().startswith(magic)
    assert capsys.readouterr().err == ""
