"""Run directories under kills and concurrent use: a kill at any rename resumes exactly; one writer per run.

The kill test runs in a subprocess of its own (one thread, so runs are bit-reproducible across the
processes it forks). It trains an uninterrupted reference, counts the renames a short run makes (a
``--max-steps`` stop, then ``--resume`` to the end: every kind of save), and then, for every n, forks a
child whose n-th ``os.replace`` ends the process with ``os._exit``, before the rename or just after it.
Each killed directory is then recovered the way a user would (``resume``; or ``train`` again when the
kill came before the run record existed) and must end with the reference's weights, its epochs once
each in ``metrics.jsonl``, and no temporary file left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from headreg.cli import main
from headreg.engine.train import TrainConfig, resume, train

CONFIG = dict(
    model="lenetpp",
    head="softmax",
    dataset="fake",
    embedding_dim=8,
    model_options={"widths": [4, 8, 8]},
    epochs=2,
    batch_size=32,
    optimizer="adamw",
    lr=3e-3,
    limit=64,
    test_limit=64,
    device="cpu",
    eval_metrics=(),
)
#: The same run validating every 2 steps and keeping best/: its validations and best/ must survive kills too.
CONFIG_VAL = dict(CONFIG, val=["fake@test"], val_every="2steps", keep_best="precision_at_1")

_WORKER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from headreg.engine.train import TrainConfig, resume, train

    root, config = Path(sys.argv[1]), json.loads(sys.argv[2])
    quiet = dict(progress=False, log=lambda line: None)
    real_replace = os.replace


    def run(out):
        train(TrainConfig(**config), out, stop_after_steps=1, **quiet)
        return resume(out, **quiet)


    def weights(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


    def best(out):  # the kept model, and the validations (their timing aside)
        if not config.get("keep_best"):
            return None, []
        from safetensors.torch import load_file

        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        vals = [{k: v for k, v in r.items() if k != "val_time"} for r in lines if "val" in r]
        return load_file(str(out / "best" / "model.safetensors")), vals


    calls = []
    os.replace = lambda a, b: (calls.append(str(b)), real_replace(a, b))[1]
    reference = weights(train(TrainConfig(**config), root / "reference", **quiet).model)
    reference_best, reference_vals = best(root / "reference")
    calls.clear()
    run(root / "counted")
    os.replace = real_replace
    renames = len(calls)

    failures = []
    for mode in ("before", "after"):
        for n in range(1, renames + 1):
            out = root / f"{mode}-{n}"
            pid = os.fork()
            if pid == 0:  # the child: killed for real at its n-th rename
                seen = [0]

                def dying_replace(a, b):
                    seen[0] += 1
                    if seen[0] == n and mode == "before":
                        os._exit(86)
                    real_replace(a, b)
                    if seen[0] == n:
                        os._exit(86)

                os.replace = dying_replace
                try:
                    run(out)
                finally:
                    os._exit(87)  # the run ended without being killed
            _, status = os.waitpid(pid, 0)
            case = f"{mode} rename {n} ({calls[n - 1]})"
            if os.waitstatus_to_exitcode(status) != 86:
                failures.append(f"{case}: the child was not killed there (exit {status})")
                continue
            try:
                if (out / "run.json").exists():
                    result = resume(out, **quiet)
                else:  # killed before the run record: the directory is free for the same command again
                    result = train(TrainConfig(**config), out, **quiet)
            except Exception as exc:  # noqa: BLE001 - reported to the test
                failures.append(f"{case}: recovery failed: {type(exc).__name__}: {exc}")
                continue
            got = weights(result.model)
            if any(not torch.equal(got[k], v) for k, v in reference.items()):
                failures.append(f"{case}: weights differ from the uninterrupted run")
            lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            epochs = [r["epoch"] for r in lines if "val" not in r]
            if epochs != list(range(1, config["epochs"] + 1)):
                failures.append(f"{case}: metrics.jsonl epochs {epochs}")
            kept, vals = best(out)
            if vals != reference_vals:
                failures.append(f"{case}: validations differ: {[r['step'] for r in vals]}")
            if kept is not None and any(not torch.equal(kept[k], v) for k, v in reference_best.items()):
                failures.append(f"{case}: best/ differs from the uninterrupted run's")
            left = sorted(p.name for p in [*out.iterdir(), *out.glob("best/*")] if "tmp" in p.name)
            if left:
                failures.append(f"{case}: temporary files left: {left}")
            if json.loads((out / "run.json").read_text())["status"] != "completed":
                failures.append(f"{case}: run.json not completed")
    print(json.dumps({"renames": calls, "failures": failures}))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per kill")
@pytest.mark.parametrize("config", [CONFIG, pytest.param(CONFIG_VAL, marks=pytest.mark.slow)], ids=["plain", "val"])
def test_a_kill_at_any_rename_resumes_to_the_uninterrupted_weights(config: dict, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, str(tmp_path), json.dumps(config)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {Path(p).name for p in report["renames"]}
    # Every kind of file a run commits was a kill point: the record, the model, the state, metrics.jsonl.
    assert {"run.json", "model.safetensors", "config.json", "resume.json", "metrics.jsonl", "eval.json"} <= names, names
    assert any(n.startswith("resume-") for n in names), names
    if config.get("keep_best"):
        assert any(p.endswith("best/model.safetensors") for p in report["renames"]), names
    assert report["failures"] == [], "\n".join(report["failures"])


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    from headreg.engine.train import resume

    run, ready, release = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])


    def hold(step):
        ready.touch()
        deadline = time.monotonic() + 60
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


    resume(run, progress=False, on_step=hold, log=lambda line: None)
    """
)


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(TrainConfig(**CONFIG), run, stop_after_steps=1, progress=False, log=lambda line: None)
    ready, release = tmp_path / "ready", tmp_path / "release"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run), str(ready), str(release)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), holder.stderr.read() if holder.poll() is not None else "holder never started"
        r = CliRunner().invoke(main, ["train", "--resume", str(run), "--no-progress"])
        assert r.exit_code == 1, r.output
        assert "is in use by another headreg process" in r.output and f"pid {holder.pid} on host" in r.output
        assert "Traceback" not in r.output
        # The guard of a new run (--overwrite included) waits for the lock too: nothing is deleted under a run.
        r = CliRunner().invoke(
            main, ["train", "--model", "lenetpp", "--head", "softmax", "--dataset", "fake", "--out", str(run),
                   "--overwrite", "--no-progress"],
        )  # fmt: skip
        assert r.exit_code == 1 and "in use by another headreg process" in r.output, r.output
    finally:
        release.touch()
        assert holder.wait(timeout=120) == 0
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]  # one writer: each epoch once
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


def test_leftover_temporary_files_never_refuse_a_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(TrainConfig(**CONFIG), run, stop_after_steps=1, progress=False, log=lambda line: None)
    # What killed writes leave: ours, safetensors' own, a lock file of a process long gone.
    for name in ("run.json.tmp", "resume-7.tmp.safetensors", ".tmpAb12Cd", "model.safetensors.tmp"):
        (run / name).write_bytes(b"half")
    (run / "headreg.lock").write_text('{"pid": 999999999, "host": "gone"}\n')
    done = resume(run, progress=False, log=lambda line: None)
    assert done.status == "completed"
    assert sorted(p.name for p in run.iterdir() if "tmp" in p.name) == []
    # A directory holding nothing but leftovers takes a new run without --overwrite.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "run.json.tmp").write_bytes(b"half")
    (fresh / "headreg.lock").write_text("")
    train(TrainConfig(**CONFIG), fresh, progress=False, log=lambda line: None)
    # --overwrite of a finished run is not refused for a leftover either.
    (fresh / ".tmpZZ99zz").write_bytes(b"half")
    train(TrainConfig(**CONFIG), fresh, overwrite=True, progress=False, log=lambda line: None)


def test_a_run_killed_before_its_first_state_resumes_from_the_start(tmp_path: Path) -> None:
    ref = train(TrainConfig(**CONFIG), tmp_path / "ref", progress=False, log=lambda line: None)
    run = tmp_path / "run"
    train(TrainConfig(**CONFIG), run, stop_after_steps=1, progress=False, log=lambda line: None)
    for entry in run.iterdir():  # as if killed after run.json, before the first resume.json
        if entry.name.startswith("resume"):
            entry.unlink()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "loss": 9.0}\n')
    lines: list[str] = []
    done = resume(run, progress=False, log=lines.append)
    assert any("starting from the beginning" in line for line in lines), lines
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, done.model.state_dict()[k]), k
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_sigterm_stops_cleanly_and_resumes_exactly(tmp_path: Path) -> None:
    import signal

    before = signal.getsignal(signal.SIGTERM)
    full = train(TrainConfig(**CONFIG), tmp_path / "full", progress=False, log=lambda line: None)
    lines: list[str] = []

    def terminate(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's polite kill: as the first Ctrl-C

    stopped = train(TrainConfig(**CONFIG), tmp_path / "part", on_step=terminate, progress=False, log=lines.append)
    assert stopped.status == "stopped" and stopped.global_step == 3
    assert any("terminated (SIGTERM)" in line for line in lines), lines
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is only the run's
    done = resume(tmp_path / "part", progress=False, log=lambda line: None)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, done.model.state_dict()[k]), k
