"""Answer extraction and equivalence: the evaluation grader and the VeRL reward.

Pipeline for one response:

1. (optional, ``require_think=True``) keep only the text after the last ``</think>``; none -> incorrect.
2. :func:`extract_boxed` takes the content of the **last** ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces
   matched; ``\\boxed 5`` without braces is accepted up to the next space or ``$``). No box, an empty box
   or an unbalanced box -> no answer -> incorrect.
3. :func:`normalize_answer` makes cheap textual clean-ups (``\\dfrac``/``\\tfrac``, ``\\left``/``\\right``,
   degrees, ``\\%``, spacing commands, surrounding ``$``, a trailing period, ``x =`` prefixes kept).
   An answer longer than :data:`MAX_ANSWER_CHARS` is incorrect without being parsed.
4. Fast path: equal normalised strings -> correct; two different integers -> incorrect.
5. Otherwise math-verify decides (``parse`` + ``verify``, gold first) inside a worker **process** of a
   small pool, with a per-answer time limit. A worker that does not answer in time is killed and
   replaced, and the answer is incorrect. math-verify's own ``signal.alarm`` timeouts are disabled,
   so every function here is safe to call from any thread and from many processes at once.

Example::

    >>> from m1_eval.grading import grade, extract_boxed
    >>> extract_boxed(r"so the answer is \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> grade(r"... \\boxed{\\dfrac{1}{2}}", "0.5")
    True
    >>> grade(r"... \\boxed{9^{9^{9^{9^{9}}}}}", "1", timeout_s=1.0)  # returns in about a second
    False
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

DEFAULT_TIMEOUT_S = 5.0
"""Default per-answer time limit (seconds) for the math-verify step."""

MAX_ANSWER_CHARS = 1000
"""Extracted answers longer than this are judged incorrect without parsing (hostile-input guard)."""

WORKER_START_TIMEOUT_S = 120.0
"""How long a fresh worker may take to import math-verify (not counted in the per-answer limit)."""

SOFT_FRACTION = 0.8
"""The worker interrupts itself (``setitimer``) at this fraction of the limit; the parent kills it at the limit."""

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")


# ----------------------------------------------------------------------------------------------
# extraction and normalisation
# ----------------------------------------------------------------------------------------------
def extract_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text`` (braces matched), else ``None``.

    Empty or unbalanced boxes give ``None``; ``\\boxed 7`` (no brace) gives ``'7'``.

    Example::

        >>> extract_boxed(r"\\boxed{1} then \\boxed{\\frac{a}{b}}")
        '\\\\frac{a}{b}'
        >>> extract_boxed("no box here") is None
        True
    """
    if not text:
        return None
    matches = list(_BOX_RE.finditer(text))
    for m in reversed(matches):
        i = m.end()
        n = len(text)
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == "{":
            depth, j = 0, i
            while j < n:
                c = text[j]
                if c == "\\":  # skip escaped characters such as \{ and \}
                    j += 2
                    continue
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        content = text[i + 1 : j].strip()
                        return content or None
                j += 1
            continue  # unbalanced: try an earlier box
        if i > m.end():  # "\boxed 7": one token
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                return tok.group(0).rstrip(".")
    return None


def strip_think(text: str) -> str | None:
    """Text after the last ``</think>``, or ``None`` when there is none (the M1/DeepScaleR reward rule)."""
    k = text.rfind("</think>")
    return None if k < 0 else text[k + len("</think>") :]


_REPLACEMENTS = [
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    (re.compile(r"\\left\b|\\right\b|\\big[lr]?\b|\\Big[lr]?\b"), ""),
    (re.compile(r"(?<!\\)\\[!,;: ]|~|\\quad\b|\\qquad\b"), " "),
    (re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree"), ""),
    (re.compile(r"\\%|%"), ""),
    (re.compile(r"\\displaystyle|\\textstyle"), ""),
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\s+"), " "),
]
_INT_RE = re.compile(r"[+-]?\d+")
_NUM_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,3})?")
_SCI_RE = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))[eE]([+-]?\d{1,3})")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def normalize_answer(answer: str | float | int | None) -> str | None:
    """Cheap textual normalisation of an answer string (``None`` stays ``None``).

    Example::

        >>> normalize_answer(r"$\\dfrac{1}{2}$.")
        '\\\\frac{1}{2}'
        >>> normalize_answer(27.0)
        '27'
    """
    if answer is None:
        return None
    if isinstance(answer, float):
        answer = str(int(answer)) if answer.is_integer() else repr(answer)
    s = str(answer).strip().rstrip(".").strip()  # a sentence's full stop may follow the closing $
    boxed = extract_boxed(s) if s.startswith(("\\boxed", "\\fbox")) else None
    if boxed is not None:
        s = boxed
    for a, b in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(a) and s.endswith(b) and len(s) >= len(a) + len(b):
            s = s[len(a) : len(s) - len(b)].strip()
    for pat, rep in _REPLACEMENTS:
        s = pat.sub(rep, s)
    s = s.strip().rstrip(".").strip()
    sci = _SCI_RE.fullmatch(s) if len(s) <= 60 else None
    if sci:  # 1.5e3 -> 1.5\times10^{3} (math-verify would read "e" as Euler's number)
        s = f"{sci.group(1)}\\times10^{{{sci.group(2)}}}"
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if s.startswith("\\text{") and s.endswith("}") and s.count("{") == 1:
        s = s[6:-1].strip()
    return s or None


def _as_number(s: str) -> Fraction | None:
    if len(s) > 60 or not _NUM_RE.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _fast_verdict(gold: str, pred: str) -> bool | None:
    """Decide without math-verify when it is certain; ``None`` means "ask math-verify"."""
    if gold == pred or gold.replace(" ", "") == pred.replace(" ", ""):
        return True
    g, p = _as_number(gold), _as_number(pred)
    if g is not None and p is not None:
        if g == p:
            return True
        if _INT_RE.fullmatch(gold) and _INT_RE.fullmatch(pred):
            return False
    return None


# ----------------------------------------------------------------------------------------------
# worker pool
# ----------------------------------------------------------------------------------------------
class _Worker:
    def __init__(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "m1_eval._grade_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False

    def _read_line(self, deadline: float) -> bytes:
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            r, _, _ = select.select([self.fd], [], [], remaining)
            if not r:
                raise TimeoutError
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError("grader worker exited")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def wait_ready(self) -> None:
        if self.ready:
            return
        try:
            self._read_line(time.monotonic() + WORKER_START_TIMEOUT_S)
        except (TimeoutError, EOFError) as e:
            self.kill()
            raise RuntimeError(
                "m1_eval grader worker failed to start; is math-verify installed? "
                "(pip install 'math-verify[antlr4_9_3]>=0.9')"
            ) from e
        self.ready = True

    def verify(self, gold: str, pred: str, timeout_s: float) -> bool:
        req = {"op": "verify", "gold": gold, "pred": pred, "soft_s": SOFT_FRACTION * timeout_s}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        line = self._read_line(time.monotonic() + timeout_s)
        return json.loads(line)["ok"] is True

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass


class GraderPool:
    """A small pool of math-verify worker processes with a per-answer time limit.

    Thread-safe; one pool per process (see :func:`get_pool`). ``size`` defaults to
    ``$M1_EVAL_GRADER_WORKERS`` or ``min(4, cpu_count)``. Workers start on first use (importing
    math-verify takes 1-3 s, not counted in the time limit). Once the pool is in use, one extra warm
    "spare" worker waits to replace a killed one instantly (``M1_EVAL_GRADER_SPARE=0`` disables it).

    Example::

        >>> from m1_eval.grading import GraderPool
        >>> pool = GraderPool(size=1)
        >>> pool.verify(r"\\frac{1}{2}", "0.5", timeout_s=5.0)
        True
        >>> pool.close()
    """

    def __init__(self, size: int | None = None) -> None:
        if size is None:
            size = int(os.environ.get("M1_EVAL_GRADER_WORKERS", "0")) or min(4, os.cpu_count() or 1)
        self.size = max(1, size)
        self.spare = os.environ.get("M1_EVAL_GRADER_SPARE", "1") != "0"
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._created = 0
        self._all: set[_Worker] = set()
        self._spare: _Worker | None = None
        self.timeouts = 0
        self.calls = 0

    def _acquire(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._created < self.size:
                self._created += 1
                w = _Worker()
                self._all.add(w)
                return w
        return self._idle.get()

    def _replace(self, w: _Worker) -> None:
        """Kill a stuck worker; its slot goes to the warm spare, and a new spare starts."""
        w.kill()
        with self._lock:
            self._all.discard(w)
            nw, self._spare = (self._spare or _Worker()), _Worker()
            self._all.update((nw, self._spare))
        self._idle.put(nw)

    def verify(self, gold: str, pred: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
        """math-verify equivalence of two answer strings, ``False`` on timeout or any error."""
        w = self._acquire()
        try:
            w.wait_ready()
        except RuntimeError:
            with self._lock:
                self._all.discard(w)
                self._created -= 1
            raise
        self.calls += 1
        if self._spare is None and self.spare:
            with self._lock:  # a warm replacement for the first worker that gets stuck
                if self._spare is None:
                    self._spare = _Worker()
                    self._all.add(self._spare)
        try:
            ok = w.verify(gold, pred, timeout_s)
        except (TimeoutError, EOFError, OSError, ValueError, KeyError):
            self.timeouts += 1
            self._replace(w)
            return False
        self._idle.put(w)
        return ok

    def close(self) -> None:
        """Kill every worker (the pool can be used again afterwards)."""
        with self._lock:
            workers, self._all = list(self._all), set()
            self._created, self._spare = 0, None
            self._idle = queue.Queue()
        for w in workers:
            w.kill()


_POOL: GraderPool | None = None
_POOL_PID: int | None = None
_POOL_LOCK = threading.Lock()


def get_pool() -> GraderPool:
    """The process-wide :class:`GraderPool` (a fresh one after ``fork``)."""
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_PID != os.getpid():
            _POOL, _POOL_PID = GraderPool(), os.getpid()
        return _POOL


@atexit.register
def _close_pool() -> None:
    if _POOL is not None and _POOL_PID == os.getpid():
        _POOL.close()


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def is_equiv(gold: str | float | int | None, pred: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether answer ``pred`` equals answer ``gold`` (already extracted; neither is a full response).

    Example::

        >>> is_equiv("2\\\\sqrt{2}", "\\\\sqrt{8}")
        True
    """
    if pred is not None and len(str(pred)) > 2 * MAX_ANSWER_CHARS:
        return False
    g, p = normalize_answer(gold), normalize_answer(pred)
    if not g or not p or len(p) > MAX_ANSWER_CHARS or len(g) > 4 * MAX_ANSWER_CHARS:
        return False
    fast = _fast_verdict(g, p)
    if fast is not None:
        return fast
    return get_pool().verify(g, p, timeout_s)


def extract_answer(response_text: str | None, require_think: bool = False) -> str | None:
    """The answer a response gives: last box content (after ``</think>`` if ``require_think``), or ``None``."""
    if response_text is None:
        return None
    if require_think:
        response_text = strip_think(response_text)
        if response_text is None:
            return None
    return extract_boxed(response_text)


def grade(
    response_text: str,
    ground_truth: str | float | int,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    require_think: bool = False,
) -> bool:
    """Whether a model response answers ``ground_truth`` correctly (never raises for bad input, never hangs).

    ``ground_truth`` may be a plain answer or itself boxed. Safe from any thread and any process.

    Example::

        >>> grade(r"The area is \\boxed{2\\frac{1}{2}}", "5/2")
        True
        >>> grade("I don't know", "5")
        False
    """
    try:
        return is_equiv(ground_truth, extract_answer(response_text, require_think), timeout_s)
    except RuntimeError:
        raise
    except Exception:  # noqa: BLE001 - the reward must never crash a run
        return False


def grade_many(
    responses: Sequence[str],
    ground_truths: Sequence[str | float | int],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    require_think: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[bool]:
    """:func:`grade` over many pairs, in parallel over the worker pool; ``progress(1)`` after each.

    Example::

        >>> grade_many([r"\\boxed{3}", r"\\boxed{4}"], ["3", "3"])
        [True, False]
    """
    if len(responses) != len(ground_truths):
        raise ValueError("responses and ground_truths differ in length")

    def one(i: int) -> bool:
        ok = grade(responses[i], ground_truths[i], timeout_s, require_think)
        if progress is not None:
            progress(1)
        return ok

    with ThreadPoolExecutor(max_workers=get_pool().size) as ex:
        return list(ex.map(one, range(len(responses))))


def answer_labels(
    answers: Sequence[str | None], verdicts: Sequence[bool], timeout_s: float = DEFAULT_TIMEOUT_S
) -> list[int]:
    """Equivalence-class labels of one problem's sampled answers, for majority voting.

    Correct answers form class ``0``; samples without an answer get ``-1`` (they do not vote); wrong
    answers are grouped into classes ``1, 2, ...`` by :func:`is_equiv` against each class's first
    member (in sample order). Class 0 is therefore exactly the set of correct samples.

    Example::

        >>> answer_labels(["3", None, "4", "4.0", r"\\frac{6}{2}"], [True, False, False, False, True])
        [0, -1, 1, 1, 0]
    """
    labels: list[int] = []
    reps: list[str] = []
    by_key: dict[str, int] = {}
    for ans, ok in zip(answers, verdicts):
        if ok:
            labels.append(0)
            continue
        key = normalize_answer(ans) if ans is not None and len(ans) <= 2 * MAX_ANSWER_CHARS else None
        if not key or len(key) > MAX_ANSWER_CHARS:
            labels.append(-1)
            continue
        if key not in by_key:
            found = next((c + 1 for c, rep in enumerate(reps) if is_equiv(rep, key, timeout_s)), None)
            if found is None:
                reps.append(key)
                found = len(reps)
            by_key[key] = found
        labels.append(by_key[key])
    return labels


def compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None, **kwargs
) -> float:
    """VeRL ``custom_reward_function`` entry point: 1.0 if correct else 0.0.

    Uses the M1 rule (answer after ``</think>``) when ``extra_info`` has ``require_think=True``.

    Example::

        >>> compute_score("math500", r"\\boxed{10}", "10")
        1.0
    """
    require_think = bool((extra_info or {}).get("require_think", False))
    return 1.0 if grade(solution_str, ground_truth, require_think=require_think) else 0.0
