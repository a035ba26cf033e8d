"""The fault suite: the main job's launcher as a user runs it, in subprocesses.

Tiny random model, robustness stages off, one prompt format: each run takes seconds.
The scenarios run concurrently (a small thread pool, each thread drives its own
processes) so the suite stays within a few minutes on two cores; every test then
asserts on what its scenario saw. A scenario that fails makes its own test fail.

  kill -9 in each stage  a chain of runs in one workdir, each killed (SIGKILL, sent
                         from here) right after a stage line on stderr or a
                         committed checkpoint; the last run finishes; every output,
                         the final checkpoint's arrays and the full edit history
                         equal an uninterrupted run's, bit for bit
  two concurrent runs    a second run on a busy workdir is refused in one line; the
                         lock dies with its killed holder (the chain goes on)
  NaN                    --config.edit.lr=inf stops at step 1 naming the term, in
                         one line, exit 2, no checkpoint saved
  changed input          a run records inputs.json; the sports CSV changes; the
                         rerun is refused naming config.data.sports_source
  truncated output       a truncated knowledge.json is refused naming the file and
                         the remedy
  read-only workdir      a finished run reruns from a read-only workdir: exit 0,
                         results printed, no file touched
  bad config             refused before anything is written (no config.json), every
                         problem named by its config. key
  launchers              predict (prompt longer than the context), attack (not a
                         run's workdir), sweep (bad config): one line, exit 2

Set MECH_UNLEARN_FAULTS_FULL=1 to kill after every stage line instead of a chosen
five (about twice the time).
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config=configs/sports_first16.py:tiny",
    "--config.robustness.relearn=False",
    "--config.robustness.probes=False",
    "--config.robustness.soft_prompt=False",
    "--config.robustness.trivia=False",
    "--config.eval.formats=standard",
]
STAGE_LINE = re.compile(rb"\[mech_unlearn_jax\] (\S(?:.*?\S)?)\s+\d+\.\d+ s")
TIMEOUT_S = 400
FULL = os.environ.get("MECH_UNLEARN_FAULTS_FULL") == "1"

# Kill triggers of the chain, in order: (what to wait for, where the kill lands).
# A stage line is printed when that stage ends, so the kill lands in the next one.
if FULL:
  KILLS = [("load model", "knowledge"), ("knowledge", "split"), ("split", "localize"),
           ("localize", "retain text"), ("retain text", "evaluate unedited"),
           ("evaluate unedited", "edit (no checkpoint yet)"), ("checkpoint 2", "edit (after checkpoint 2)"),
           ("edit", "evaluate edited"), ("evaluate edited", "report")]
else:
  KILLS = [("load model", "knowledge"), ("split", "localize"), ("retain text", "evaluate unedited"),
           ("checkpoint 2", "edit (after checkpoint 2)"), ("edit", "evaluate edited")]

_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()
# Set by the `scenarios` fixture: XLA executables are cached there, so only the first
# runs compile (a run's CPU time drops from ~20 s to ~8 s; results are the same).
_compilation_cache: list[pathlib.Path] = []


class Launch:
  """A launcher subprocess whose stdout and stderr are read as they come."""

  def __init__(self, module: str, args: list[str], prefix: list[str] | None = None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if _compilation_cache:
      env.update(
          # The launchers' own cache (under the user's cache dir) is off: a suite-local
          # one keeps the runs hermetic and also caches the quick compiles.
          MECH_UNLEARN_JAX_COMPILATION_CACHE="0",
          JAX_COMPILATION_CACHE_DIR=str(_compilation_cache[0]),
          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
          JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
      )
    self.proc = subprocess.Popen(
        [*(prefix or []), sys.executable, "-m", module, *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    with _live_lock:
      _live.add(self.proc)
    self._buffers = {"out": bytearray(), "err": bytearray()}
    self._changed = threading.Condition()
    self._threads = [
        threading.Thread(target=self._drain, args=(self.proc.stdout, "out"), daemon=True),
        threading.Thread(target=self._drain, args=(self.proc.stderr, "err"), daemon=True),
    ]
    for t in self._threads:
      t.start()

  def _drain(self, stream, name):
    for chunk in iter(lambda: stream.read1(65536), b""):
      with self._changed:
        self._buffers[name] += chunk
        self._changed.notify_all()
    with self._changed:
      self._changed.notify_all()

  @property
  def stderr(self) -> str:
    return self._buffers["err"].decode("utf-8", "replace")

  @property
  def stdout(self) -> str:
    return self._buffers["out"].decode("utf-8", "replace")

  def stages(self) -> list[str]:
    return [m.decode() for m in STAGE_LINE.findall(bytes(self._buffers["err"]))]

  def wait_until(self, predicate, timeout: float = TIMEOUT_S) -> bool:
    """True once `predicate()` holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    with self._changed:
      while not predicate():
        if self.proc.poll() is not None:
          return predicate()
        if time.monotonic() > deadline:
          raise TimeoutError(f"waited {timeout}s; stderr so far:\n{self.stderr[-3000:]}")
        self._changed.wait(0.05)
    return True

  def kill(self) -> None:
    """SIGKILL, as a crash or an OOM killer would."""
    if self.proc.poll() is None:
      os.kill(self.proc.pid, signal.SIGKILL)
    self.finish()

  def finish(self, timeout: float = TIMEOUT_S) -> int:
    try:
      rc = self.proc.wait(timeout)
    finally:
      with _live_lock:
        _live.discard(self.proc)
    for t in self._threads:
      t.join(10)
    return rc


def run_main(workdir: pathlib.Path, *extra: str, prefix: list[str] | None = None) -> Launch:
  return Launch("launch.run", [*TINY, f"--workdir={workdir}", *extra], prefix=prefix)


def finished(launch: Launch) -> tuple[int, str, str]:
  rc = launch.finish()
  return rc, launch.stdout, launch.stderr


def error_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.startswith("error (")]


def assert_one_line_error(rc: int, stderr: str, *needles: str) -> str:
  assert rc == 2, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = error_lines(stderr)
  assert len(lines) == 1, stderr[-3000:]
  for needle in needles:
    assert re.search(needle, lines[0]), (needle, lines[0])
  return lines[0]


# ------------------------------------------------------------------------ scenarios


def scenario_reference(root: pathlib.Path) -> pathlib.Path:
  """One uninterrupted run: the ground truth the fault runs must reproduce."""
  workdir = root / "reference"
  rc, _, err = finished(run_main(workdir))
  assert rc == 0, err[-3000:]
  return workdir


def _kill_predicate(launch: Launch, workdir: pathlib.Path, trigger: str):
  if trigger == "checkpoint 2":
    return lambda: (workdir / "checkpoints" / "2" / "commit_success.txt").is_file()
  return lambda: trigger in launch.stages()


def scenario_chain(root: pathlib.Path) -> dict:
  """Runs killed in turn at every trigger of KILLS, then one that finishes."""
  workdir = root / "chain"
  seen = {"kills": [], "busy": None}
  for i, (trigger, lands_in) in enumerate(KILLS):
    launch = run_main(workdir)
    if i == 0:
      # While the first run holds the workdir, a second one must be refused at once.
      # config.json is written under the lock, before the model loads.
      launch.wait_until(lambda: (workdir / "config.json").is_file())
      second = run_main(workdir)
      seen["busy"] = finished(second)
      seen["busy_first_alive"] = launch.proc.poll() is None
    reached = launch.wait_until(_kill_predicate(launch, workdir, trigger))
    assert reached, f"run {i} ended before {trigger!r}:\n{launch.stderr[-3000:]}"
    launch.kill()
    seen["kills"].append({"after": trigger, "lands_in": lands_in, "stages_done": launch.stages()})
  rc, out, err = finished(run_main(workdir))
  assert rc == 0, err[-3000:]
  seen["final_stdout"] = out
  seen["workdir"] = workdir
  return seen


def scenario_nan(root: pathlib.Path) -> dict:
  workdir = root / "nan"
  rc, _, err = finished(run_main(workdir, "--config.edit.lr=inf"))
  return {"rc": rc, "stderr": err, "workdir": workdir}


def scenario_shared(root: pathlib.Path) -> dict:
  """Two methods of one setting through one --shared_dir: the second reads back the
  knowledge filter, the fact-lookup evidence (both methods' budget comes from it) and
  the unedited evaluation. (The tiny fact-lookup config pins its layers, so it would
  not compute the evidence; random MLPs and AP both run the rule.)"""
  shared = root / "shared"

  def launch(method: str, workdir: pathlib.Path) -> Launch:
    args = [f"--config=configs/sports_first16.py:{method},tiny", *TINY[1:], f"--workdir={workdir}",
            f"--shared_dir={shared}"]
    return Launch("launch.run", args)

  first = finished(launch("random_mlps", root / "shared_rmlp"))
  unedited = sorted(shared.glob("sports_first_4-*/seed0/unedited/evaluation/unedited.json"))
  before = {p: p.stat().st_mtime_ns for p in shared.rglob("*") if p.is_file()}
  second = finished(launch("ap", root / "shared_ap"))
  after = {p: p.stat().st_mtime_ns for p in shared.rglob("*") if p.is_file()}
  return {"first": first, "second": second, "unedited": unedited, "before": before, "after": after,
          "workdirs": (root / "shared_rmlp", root / "shared_ap")}


def scenario_changed_input(root: pathlib.Path) -> dict:
  """A run on a CSV records its fingerprint; the CSV changes; the rerun is refused."""
  from mech_unlearn_jax.data import facts as facts_lib  # pylint: disable=g-import-not-at-top

  workdir = root / "changed"
  table = root / "athletes_small.csv"
  lines = facts_lib.embedded_athletes_path().read_text().splitlines()
  table.write_text("\n".join(lines[:61]) + "\n")
  flag = f"--config.data.sports_source={table}"
  first = run_main(workdir, flag)
  # inputs.json is written before the model loads; the first stage line is enough.
  first.wait_until(lambda: "load model" in first.stages())
  recorded = (workdir / "inputs.json").is_file()
  first.kill()
  rows = list(csv.DictReader(table.read_text().splitlines()))
  # A valid edit: the first athlete's sport becomes their (other) edit target.
  rows[0]["sport"], rows[0]["inject_sport_without_golf"] = rows[0]["inject_sport_without_golf"], rows[0]["sport"]
  with open(table, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  rc, _, err = finished(run_main(workdir, flag))
  return {"recorded": recorded, "rc": rc, "stderr": err}


def scenario_truncated(root: pathlib.Path, reference: pathlib.Path) -> dict:
  workdir = root / "truncated"
  shutil.copytree(reference, workdir)
  path = workdir / "knowledge.json"
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  rc, _, err = finished(run_main(workdir))
  return {"rc": rc, "stderr": err, "path": path}


def _snapshot(root: pathlib.Path) -> dict:
  return {
      str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
      for p in sorted(root.rglob("*")) if p.is_file()
  }


def scenario_read_only(root: pathlib.Path, reference: pathlib.Path) -> dict:
  workdir = root / "read_only"
  shutil.copytree(reference, workdir)
  before = _snapshot(workdir)
  if os.geteuid() == 0:
    # Root ignores permission bits: a read-only bind mount in a private mount
    # namespace is what a read-only disk looks like.
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
      return {"skip": "root without mount namespaces: cannot make a read-only workdir"}
    launch = Launch("launch.run", [*TINY, f"--workdir={workdir}"], prefix=[
        "unshare", "-m", "sh", "-c", f'mount --bind -o ro "{workdir}" "{workdir}" && exec "$@"', "sh",
    ])
  else:
    for p in [workdir, *workdir.rglob("*")]:
      p.chmod(p.stat().st_mode & ~0o222)
    launch = run_main(workdir)
  rc, out, err = finished(launch)
  if os.geteuid() != 0:
    for p in [workdir, *workdir.rglob("*")]:
      p.chmod(p.stat().st_mode | 0o200)
  after = _snapshot(workdir)
  if os.geteuid() != 0:  # the chmod back changed modes; compare bytes and times
    before = {k: v[:2] for k, v in before.items()}
    after = {k: v[:2] for k, v in after.items()}
  return {"rc": rc, "stdout": out, "stderr": err, "same": before == after,
          "changed": sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))}


def scenario_bad_configs(root: pathlib.Path) -> dict:
  out = {}
  many = root / "bad_many"
  out["many"] = finished(run_main(
      many, "--config.eval.formats=('standard','bogus')", "--config.data.split=firts_4",
      "--config.edit.retain_batch_size=0", "--config.localize.layers=7",
      f"--config.retain.source={root / 'missing.txt'}", f"--config.data.sports_source={root / 'missing.csv'}",
  )) + (many,)
  warm = root / "bad_warmup"
  out["warmup"] = finished(run_main(warm, "--config.edit.warmup_steps=3")) + (warm,)
  return out


def scenario_launchers(root: pathlib.Path) -> dict:
  out = {}
  # More tokens than the 32k context; too long for one argv entry, so from a flagfile.
  flagfile = root / "long_prompt.flags"
  flagfile.write_text("--prompt=" + "plays " * 33000 + "\n")
  out["predict"] = finished(Launch("launch.predict", ["--model=tiny-gemma3", f"--flagfile={flagfile}"]))
  out["attack"] = finished(Launch("launch.attack", [f"--workdir={root / 'not_a_run'}"]))
  out["sweep"] = finished(Launch("launch.sweep", [*TINY, f"--workdir={root / 'sweep'}", "--config.data.split=nope"]))
  return out


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
  """Starts every scenario at once (three lanes); tests wait for their own."""
  root = tmp_path_factory.mktemp("faults")
  _compilation_cache[:] = [root / "jax_cache"]
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=3)
  futures = {}
  futures["chain"] = pool.submit(scenario_chain, root)
  futures["reference"] = pool.submit(scenario_reference, root)

  def after_reference(fn):
    return lambda: fn(root, futures["reference"].result())

  def third_lane():
    results = {"bad_configs": scenario_bad_configs(root), "changed": scenario_changed_input(root),
               "launchers": scenario_launchers(root), "nan": scenario_nan(root), "shared": scenario_shared(root)}
    results["read_only"] = after_reference(scenario_read_only)()
    return results

  futures["lane3"] = pool.submit(third_lane)
  futures["truncated"] = pool.submit(after_reference(scenario_truncated))
  yield futures
  for future in futures.values():
    future.cancel()
  with _live_lock:
    leftovers = list(_live)
  for proc in leftovers:  # only processes this module started
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
  pool.shutdown(wait=True, cancel_futures=True)


def _lane3(scenarios, name):
  return scenarios["lane3"].result(timeout=3 * TIMEOUT_S)[name]


# ------------------------------------------------------------------------ comparisons


def _strip_seconds(x):
  if isinstance(x, dict):
    return {k: _strip_seconds(v) for k, v in x.items() if k != "seconds"}
  if isinstance(x, list):
    return [_strip_seconds(v) for v in x]
  return x


OUTPUTS = ("config.json", "inputs.json", "knowledge.json", "split.json", "localization/localization.json",
           "evaluation/unedited.json", "evaluation/edited.json", "results.json")


def _final_state(workdir: pathlib.Path) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  state = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(steps[-1]) / "state")
  leaves = jax.tree_util.tree_leaves_with_path(state)
  return {"steps": steps, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}}


# ------------------------------------------------------------------------ tests


def test_kill_9_in_every_stage_resumes_bit_equal_with_full_history(scenarios):
  chain = scenarios["chain"].result(timeout=3 * TIMEOUT_S)
  reference = scenarios["reference"].result(timeout=3 * TIMEOUT_S)
  workdir = chain["workdir"]
  assert [k["after"] for k in chain["kills"]] == [t for t, _ in KILLS]
  for rel in OUTPUTS:
    got = _strip_seconds(json.loads((workdir / rel).read_text()))
    want = _strip_seconds(json.loads((reference / rel).read_text()))
    assert got == want, rel
  with np.load(workdir / "localization" / "mask.npz") as a, np.load(reference / "localization" / "mask.npz") as b:
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k])
  got, want = _final_state(workdir), _final_state(reference)
  assert got.keys() == want.keys() and got["steps"][-1] == want["steps"][-1] == 3
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  history = json.loads((workdir / "results.json").read_text())["edit_history"]
  assert [h["step"] for h in history] == [1, 2, 3]  # steps from before the kill included
  assert "## " in chain["final_stdout"] or "|" in chain["final_stdout"]  # results.md printed
  # No temporary file of an interrupted write is left where a reader would look.
  assert not [p for p in workdir.rglob(".*.tmp")]


def test_second_run_on_a_busy_workdir_is_refused_and_the_lock_dies_with_its_holder(scenarios):
  chain = scenarios["chain"].result(timeout=3 * TIMEOUT_S)
  rc, _, err = chain["busy"]
  assert chain["busy_first_alive"]  # the refusal happened while the first run was alive
  assert_one_line_error(rc, err, r"WorkdirBusyError", r"another run is using this workdir")
  # The kill -9 released the lock: the next run of the chain got the workdir.
  assert len(chain["kills"]) == len(KILLS)


def test_infinite_learning_rate_stops_loudly_naming_step_and_term(scenarios):
  nan = _lane3(scenarios, "nan")
  assert_one_line_error(nan["rc"], nan["stderr"], r"NonFiniteError", r"edit step 1", r"non-finite update_norm",
                        r"last good checkpoint: none")
  checkpoints = nan["workdir"] / "checkpoints"
  assert not checkpoints.exists() or not [p for p in checkpoints.iterdir() if p.name.isdigit()]
  assert not (nan["workdir"] / "results.json").exists()


def test_changed_input_file_is_refused_naming_the_input(scenarios):
  changed = _lane3(scenarios, "changed")
  assert changed["recorded"]
  assert_one_line_error(changed["rc"], changed["stderr"], r"InputsChangedError", r"config\.data\.sports_source",
                        r"athletes_small\.csv", r"restore the original input", r"new --workdir")


def test_runs_of_one_setting_share_the_method_independent_stages(scenarios):
  shared = _lane3(scenarios, "shared")
  for rc, _, err in (shared["first"], shared["second"]):
    assert rc == 0, err[-3000:]
  assert len(shared["unedited"]) == 1  # one setting folder, one seed
  # The second method recomputed nothing the first had written: every shared file is
  # the same file, untouched, and neither workdir holds its own copy. It may add its
  # own method's scores to the shared evidence (AP's, which AP-MLPs reuse), nothing else.
  assert {p: shared["after"][p] for p in shared["before"]} == shared["before"]
  added = set(shared["after"]) - set(shared["before"])
  assert all("evidence" in p.parts for p in added), added
  assert any(p.name.startswith("sports-") for p in shared["before"] if p.parent.name == "knowledge")
  assert any("evidence" in p.parts for p in shared["before"])
  for workdir in shared["workdirs"]:
    assert not (workdir / "knowledge.json").exists() and not (workdir / "evaluation" / "unedited.json").exists()
    assert (workdir / "evaluation" / "edited.json").is_file() and (workdir / "results.json").is_file()
  rmlp, ap = (json.loads((w / "results.json").read_text()) for w in shared["workdirs"])
  assert rmlp["localization"]["method"] == "random_mlps" and ap["localization"]["method"] == "ap"
  # Both budgets come from the one shared evidence.
  assert rmlp["localization"]["flu_budget"] == ap["localization"]["flu_budget"] > 0


def test_truncated_stage_output_names_the_file_and_the_remedy(scenarios):
  truncated = scenarios["truncated"].result(timeout=3 * TIMEOUT_S)
  assert_one_line_error(truncated["rc"], truncated["stderr"], re.escape(str(truncated["path"])),
                        r"not valid JSON", r"remove it")


def test_read_only_finished_workdir_reruns_and_rewrites_nothing(scenarios):
  ro = _lane3(scenarios, "read_only")
  if "skip" in ro:
    pytest.skip(ro["skip"])
  assert ro["rc"] == 0, ro["stderr"][-3000:]
  assert ro["same"], ro["changed"]
  assert "|" in ro["stdout"]  # the results table was printed


def test_bad_config_is_refused_before_anything_is_written(scenarios):
  bad = _lane3(scenarios, "bad_configs")
  rc, _, err, workdir = bad["many"]
  line = assert_one_line_error(rc, err, r"ConfigError")
  for key in ("config.eval.formats", "config.data.split", "config.edit.retain_batch_size",
              "config.retain.source", "config.data.sports_source"):
    assert key in line, (key, line)
  # The layers check needs the model's depth; it is reported with the rest when known.
  assert "config.localize.layers" in line
  assert not (workdir / "config.json").exists() and not (workdir / "inputs.json").exists()
  rc, _, err, workdir = bad["warmup"]
  assert_one_line_error(rc, err, r"config\.edit", r"warmup_steps")
  assert not (workdir / "config.json").exists()


def test_launchers_fail_in_one_line(scenarios):
  launchers = _lane3(scenarios, "launchers")
  rc, _, err = launchers["predict"]
  assert_one_line_error(rc, err, r"PromptTooLongError", r"32768")
  rc, _, err = launchers["attack"]
  assert_one_line_error(rc, err, r"not a run's workdir")
  rc, _, err = launchers["sweep"]
  assert_one_line_error(rc, err, r"config\.data\.split")
