"""What every launcher shares: logging levels, multi-host start-up, errors as one line.

Library code never reads flags; a launcher parses them, calls one library function
and turns its failure into a one-line error and a non-zero exit (the traceback only
with `--verbosity=1` or higher). Orbax and JAX log at INFO through absl; those lines
are hidden unless `--verbosity` asks for them.
"""

import logging as std_logging
import os
import signal
import sys
import traceback

from absl import flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host: run on every host).")
flags.DEFINE_enum(
    "keep_compiled", None, ["0", "1", "auto"],
    "When pipeline stages and study cells drop their compiled executables: 0 at each end,"
    " 1 never (a long study can then pass the kernel's memory-mapping limit), auto once"
    " the process is crowded. Unset: $MECH_UNLEARN_JAX_KEEP_COMPILED, else 0"
    " (launch.study: auto unless that variable is set).",
)


def _terminate(signum, frame):
  del frame
  # As Ctrl-C: open stages unwind (timing records, checkpoints' atomic writes), and the
  # one-line message says how to resume. Python runs this only between bytecodes, so
  # during a long XLA compile it waits; a second signal then ends the process at once.
  # Raised inside a garbage-collector callback (JAX registers one) the exception is
  # dropped by Python, so the request is also recorded: the next stage boundary,
  # progress update or training step raises it (`progress.raise_if_interrupted`).
  from mech_unlearn_jax import progress  # pylint: disable=g-import-not-at-top

  signal.signal(signum, signal.SIG_DFL)
  reason = f"signal {signum}"
  progress.request_interrupt(reason)
  raise KeyboardInterrupt(reason)


def setup() -> None:
  """Quiet logs by default; optional jax.distributed; log the devices."""
  import jax  # pylint: disable=g-import-not-at-top

  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    for name in ("orbax", "absl", "jax"):
      std_logging.getLogger(name).setLevel(std_logging.WARNING)
  from mech_unlearn_jax import compile_cache  # pylint: disable=g-import-not-at-top

  compile_cache.enable()
  # The flag given wins; a launcher's own default (launch.study: auto) only where the
  # environment says nothing.
  if FLAGS["keep_compiled"].present:
    os.environ["MECH_UNLEARN_JAX_KEEP_COMPILED"] = FLAGS.keep_compiled
  elif FLAGS.keep_compiled is not None:
    os.environ.setdefault("MECH_UNLEARN_JAX_KEEP_COMPILED", FLAGS.keep_compiled)
  compile_cache.keep_policy()  # a bad value fails here, not after the first stage
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, _terminate)
  if FLAGS.distributed:
    jax.distributed.initialize()
  logging.info("devices: %s", jax.devices())


def fail(error: BaseException, code: int = 2) -> None:
  """Prints `error` as one line (plus the traceback when verbose) and exits."""
  if FLAGS["verbosity"].present and FLAGS.verbosity >= 1:
    traceback.print_exception(error)
  name = type(error).__name__
  print(f"error ({name}): {error}", file=sys.stderr)
  sys.exit(code)


def _exit_now(code: int) -> None:
  """Exits without the interpreter's teardown, once every stage has unwound.

  An interrupt can land while XLA still compiles or runs on its own threads; tearing
  the interpreter and JAX's backends down under them crashed the process (exit 139
  instead of 130) in about one interrupt in three. Everything a resume needs is on disk
  by now (stages write atomically and unwound above), so only the logs and stdio are
  flushed first. Skipped with the teardown: joining non-daemon threads (none is left
  once the stages have unwound: the trainer closes its checkpoint manager) and JAX's
  exit hooks (with --distributed, the other processes see this one leave as a crash,
  which an interrupted multi-host run is anyway).
  """
  std_logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def guarded(fn):
  """Runs `fn()`; expected failures (bad config, bad file, busy workdir) become one line."""
  try:
    return fn()
  except KeyboardInterrupt:
    print("interrupted; rerun the same command to resume", file=sys.stderr)
    _exit_now(130)
  except (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError, RuntimeError, OSError,
          ArithmeticError) as e:  # ArithmeticError: the trainer's NonFiniteError
    fail(e)
