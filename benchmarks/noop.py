"""How long does a `pixelpick` command take when there is nothing to do, or when its input is wrong?

    .venv/bin/python benchmarks/noop.py            # median of 5 per command, in a scratch git + DVC project

A scheduled campaign asks every hour whether there is work; most of the time there is none. This script builds a
small project in a temporary folder (the tiny synthetic data the tests use), runs one campaign and one human round
query once, then times each command below 5 times as a subprocess, printing the median and the slowest:

- `pixelpick campaign` of the finished campaign (nothing to do);
- `pixelpick human train 0` of a human round whose job nobody has labelled yet (waiting);
- bad input: an unknown setting, a wrongly typed setting, a campaign that never started, an unknown model.

It also checks that the no-op commands write nothing: every file under the project (MLflow's database included)
keeps its size and modification time. The timings include the Python interpreter's start.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
PARAMS = """\
data:
  dataset: synthetic
  root: data/synthetic
  synthetic: {num_train: 24, num_val: 12, height: 48, width: 64, seed: 0}
model: {arch: lraspp_mobilenetv3}
train: {preset: cpu-synthetic, epochs: 2, batch_size: 8}
acquire: {strategy: margin, pixels_per_image: 10}
campaign: {name: tiny, workdir: data/runs, initial_pixels_per_image: 10, rounds: 1, seed: 0}
"""
RUNS = 5


def pixelpick(project: Path, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "pixelpick"), *args], cwd=project, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SystemExit(f"pixelpick {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def files_state(project: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in project.rglob("*")
            if p.is_file() and ".git" not in p.parts and ".dvc" not in p.parts}


def timed(project: Path, env: dict, args: list[str], expect_exit: int) -> tuple[list[float], str]:
    seconds, answer = [], ""
    for _ in range(RUNS):
        start = time.perf_counter()
        done = pixelpick(project, env, *args, check=False)
        seconds.append(time.perf_counter() - start)
        if done.returncode != expect_exit:
            raise SystemExit(f"pixelpick {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        answer = (done.stdout + done.stderr).strip().splitlines()[-1]
    return seconds, answer


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pixelpick-noop-") as folder:
        project = Path(folder)
        env = {**os.environ, "PREFECT_HOME": str(project / "prefect"), "DO_NOT_TRACK": "1",
               "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "PATH": f"{BIN}:{os.environ['PATH']}"}
        env.pop("PREFECT_API_URL", None)
        (project / "params.yaml").write_text(PARAMS)
        (project / ".gitignore").write_text("/data/synthetic/\n/data/cache/\n/prefect/\n/mlflow.db\n")
        for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
            subprocess.run(command, cwd=project, env=env, check=True)
        print("setting up: one campaign (2 rounds) and one human round's query ...", flush=True)
        pixelpick(project, env, "campaign")
        pixelpick(project, env, "human", "query", "0", "--campaign", "people", "--set", "campaign.annotator=human")

        cases = [
            ("campaign, nothing to do", ["campaign"], 0, True),
            ("human train, job not labelled", ["human", "train", "0", "--campaign", "people"], 0, True),
            ("unknown setting", ["campaign", "--set", "train.epoch=3"], 1, False),
            ("wrongly typed setting", ["campaign", "--set", "train.epochs=true"], 1, False),
            ("campaign never started", ["human", "train", "0", "--campaign", "nobody"], 1, False),
            ("unknown model", ["predict", "--model", "models:/pixelpick-nobody@best", "--images", "data/synthetic/val",
                               "--out", "labels"], 1, False),
        ]
        print(f"\n{'command':<32} {'median s':>9} {'max s':>7}  writes  answer")
        for name, args, exit_code, must_not_write in cases:
            before = files_state(project)
            seconds, answer = timed(project, env, args, exit_code)
            unchanged = files_state(project) == before
            wrote = "none" if unchanged else "SOME"
            if must_not_write and not unchanged:
                changed = sorted(k for k in before.keys() | files_state(project).keys()
                                 if before.get(k) != files_state(project).get(k))
                print(f"  changed by {name}: {changed[:5]}")
            print(f"{name:<32} {statistics.median(seconds):>9.2f} {max(seconds):>7.2f}  {wrote:<6}  {answer[:90]}")


if __name__ == "__main__":
    main()
