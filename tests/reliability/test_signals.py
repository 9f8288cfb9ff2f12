"""SIGTERM is handled like Ctrl-C: a real ``moequant quantize`` subprocess stopped mid-run exits 143,
says "moequant: interrupted", and leaves nothing behind (its temp output, its activation spill and, with
no layer finished, its progress directory are gone). After a SIGKILL the temp names stay, and the next
run beside them removes them (one log line each)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import save_toy_olmoe
from moequant.cli import main
from moequant.fsutil import host_tag
from moequant.interrupt import Terminated, interrupt_exit_code, sigterm_as_interrupt

pytestmark = pytest.mark.usefixtures("one_thread")

# The run stops in its first layer's quantization until signalled: a hook in the real code path, so
# the signal always lands mid-run, whatever the machine's speed.
_DRIVER = """
import sys, time, pathlib
import moequant.layerwise, moequant.offload

marker = pathlib.Path(sys.argv[1])

def hook(orig):
    def wrapped(*a, **k):
        marker.touch()
        time.sleep(600)
        return orig(*a, **k)
    return wrapped

moequant.offload.quantize_layer = hook(moequant.offload.quantize_layer)
moequant.layerwise.quantize_layer = hook(moequant.layerwise.quantize_layer)
from moequant.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_raises_terminated_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts the sleep
    assert signal.getsignal(signal.SIGTERM) is before
    assert interrupt_exit_code(Terminated()) == 143 and interrupt_exit_code(KeyboardInterrupt()) == 130


@pytest.fixture()
def setup(tmp_path):
    model, text = save_toy_olmoe(tmp_path, "model", 2000)
    outs, tmpdir = tmp_path / "outs", tmp_path / "tmpdir"
    outs.mkdir()
    tmpdir.mkdir()
    (outs / "sentinel.txt").write_text("keep me")
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    flags = ["--offload", "--method", "int", "--bits", "2", "--group-size", "32", "--solver", "ldlq",
             "--incoherence", "none", "--calib", str(text), "--calib-samples", "4", "--calib-seqlen", "16",
             "--calib-batch-size", "2"]
    return {"model": model, "outs": outs, "tmpdir": tmpdir, "driver": driver, "flags": flags, "root": tmp_path}


def _start(s: dict, out: Path) -> tuple[subprocess.Popen, Path]:
    marker = s["root"] / "in-first-layer"
    env = {**os.environ, "TMPDIR": str(s["tmpdir"]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(s["driver"]), str(marker), "-q", "quantize", str(s["model"]),
                             "--out", str(out), *s["flags"]], env=env, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() - t0 < 300, "the run never reached its first layer"
        time.sleep(0.05)
    return proc, marker


def _names(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def test_sigterm_mid_run_exits_143_and_leaves_nothing(setup):
    s = setup
    before = _names(s["outs"])
    proc, _ = _start(s, s["outs"] / "q")
    during = _names(s["outs"]) - before
    pid = proc.pid
    # mid-run: the output is written under a temp name, the activations spill beside it
    assert any(n.startswith(f".q.moequant-tmp-{pid}-{host_tag()}-") for n in during), during
    assert any(n.startswith(f"moequant-act-{pid}-{host_tag()}-") for n in during), during
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "moequant: interrupted"
    assert _names(s["outs"]) == before
    assert (s["outs"] / "sentinel.txt").read_text() == "keep me"
    assert _names(s["tmpdir"]) == set()


def test_sigkill_leftovers_are_cleaned_by_the_next_run(setup, capsys, caplog, monkeypatch):
    from moequant.resume import work_dir_for

    s = setup
    before = _names(s["outs"])
    proc, _ = _start(s, s["outs"] / "q")
    proc.kill()
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = _names(s["outs"]) - before
    temps = {n for n in left if f"-{proc.pid}-{host_tag()}-" in n}
    assert len(temps) == 2 and {n.split("-")[1] for n in temps} == {"tmp", "act"}, left  # .q.moequant-tmp, -act
    # the next run writing beside them (another --out, same directory) removes them first
    monkeypatch.setenv("TMPDIR", str(s["tmpdir"]))
    with caplog.at_level(logging.INFO, logger="moequant.fsutil"):
        rc = main(["-q", "quantize", str(s["model"]), "--out", str(s["outs"] / "q2"), *s["flags"]])
    assert rc == 0, capsys.readouterr().err
    removed = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("removed "))
    assert removed == sorted(f"removed {s['outs'] / n}, left behind by process {proc.pid} that no longer runs"
                             for n in temps)
    # what stays is the killed run's progress directory, kept on purpose for `quantize --resume`
    assert _names(s["outs"]) - {work_dir_for(s["outs"] / "q").name} == before | {"q2"}
    assert (s["outs"] / "sentinel.txt").read_text() == "keep me"
