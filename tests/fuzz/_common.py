"""What the fuzz harnesses share: the exceptions an input may end in, the seed corpus, and a collecting mode.

Each harness (`fuzz_*.py`) is a script: `python tests/fuzz/fuzz_tokenizer.py -max_total_time=60` runs it with
atheris (`pip install .[fuzz]`), libFuzzer's flags passed through. Without a corpus folder on the command line the
harness starts from its own seeds (valid files, written to a temporary folder), which the fuzzer mutates.

An input passes when the code under test returns, or raises one of `CLEAR_ERRORS` (ValueError and its
`CheckpointError`, json's and unicode's errors; TypeError; OSError). Anything else (IndexError, AttributeError,
RecursionError, a broken invariant, a hang) is a finding:

- by default the first finding stops the run, as libFuzzer does (atheris prints the traceback and writes the input
  to `crash-<sha1>`);
- with `FUZZ_COLLECT=1` every distinct finding (exception class and the line that raised it) is written to
  `fuzz-findings/<target>/` (the traceback and the input) and the run goes on; an input that runs longer than
  `FUZZ_HANG_S` seconds (default 5) is a hang finding.
"""

import hashlib
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

CLEAR_ERRORS = (ValueError, TypeError, OSError)


class Hang(BaseException):
    """An input ran past FUZZ_HANG_S seconds (raised by SIGALRM; a BaseException, so nothing under test eats it)."""


class InvariantError(AssertionError):
    """The code returned, but its result breaks a documented invariant."""


def _finding_key(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    ours = [frame for frame in frames if "modeling_rwkv7" in frame.filename and "/tests/" not in frame.filename]
    frame = (ours or frames or [None])[-1]
    where = f"{os.path.basename(frame.filename)}:{frame.lineno}" if frame is not None else "?"
    return f"{type(error).__name__}@{where}"


def _passing_clear_errors(test_one_input):
    """`test_one_input` for which a clear error passes; anything else stops libFuzzer with the input saved."""

    def wrapped(data: bytes) -> None:
        try:
            test_one_input(data)
        except CLEAR_ERRORS:
            pass

    return wrapped


def _collecting(target: str, test_one_input):
    out = Path(os.environ.get("FUZZ_FINDINGS", "fuzz-findings")) / target
    hang_s = int(os.environ.get("FUZZ_HANG_S", "5"))
    seen = set()

    def on_alarm(signum, frame):
        raise Hang(f"input ran over {hang_s} s")

    signal.signal(signal.SIGALRM, on_alarm)

    def wrapped(data: bytes) -> None:
        signal.alarm(hang_s)
        try:
            test_one_input(data)
        except CLEAR_ERRORS:
            pass
        except (Exception, Hang) as error:
            key = _finding_key(error)
            if key not in seen:
                seen.add(key)
                out.mkdir(parents=True, exist_ok=True)
                name = f"{key.replace('@', '-').replace(':', '-')}-{hashlib.sha1(data).hexdigest()[:12]}"
                (out / f"{name}.input").write_bytes(data)
                (out / f"{name}.txt").write_text("".join(traceback.format_exception(error)))
                print(f"\n#FINDING {target} {key} ({len(data)} bytes) -> {out / name}.input", file=sys.stderr)
        finally:
            signal.alarm(0)

    return wrapped


def fuzz(target: str, test_one_input, seeds: dict[str, bytes]) -> None:
    """Run `test_one_input` under atheris with libFuzzer's command line (`sys.argv`); `seeds` start the corpus when
    the command line names no corpus folder."""
    import atheris

    argv = list(sys.argv)
    if not any(not arg.startswith("-") for arg in argv[1:]):
        corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
        for name, data in seeds.items():
            (corpus / name).write_bytes(data)
        argv.append(str(corpus))
    if os.environ.get("FUZZ_COLLECT") == "1":
        test_one_input = _collecting(target, test_one_input)
    else:
        test_one_input = _passing_clear_errors(test_one_input)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


def run_file(test_one_input, path: str) -> None:
    """Replay one saved input (`python tests/fuzz/fuzz_X.py --replay FILE`) with the traceback shown."""
    test_one_input(Path(path).read_bytes())
