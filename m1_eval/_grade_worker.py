"""Grader worker process: reads JSON requests on stdin, answers one JSON line per request on stdout.

Started by :mod:`m1_eval.grading` as ``python -m m1_eval._grade_worker``; never imported by user code.
math-verify's own ``signal.alarm`` timeouts are disabled here: the parent kills a worker that does not
answer within the per-answer time limit and starts a fresh one.

The worker also stops itself after ``soft_s`` seconds with ``setitimer`` (it is single-threaded, so the
signal works here); that catches slow pure-Python sympy work without a restart. C-level work that ignores
signals (a giant integer power) is left to the parent's hard kill.

Protocol (one line each): request ``{"op": "verify", "gold": str, "pred": str, "soft_s": float}`` ->
``{"ok": bool}``;
``{"op": "ping"}`` -> ``{"ok": true}``. The first line written is ``{"ready": true}``.
"""

import json
import logging
import os
import sys
from functools import lru_cache


def _limit_memory() -> None:
    """Cap the address space so that a huge sympy expression fails fast instead of swapping."""
    try:
        import resource

        limit = int(os.environ.get("M1_EVAL_GRADER_MEMORY_MB", "4096")) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass


class _SoftTimeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _SoftTimeout


def main() -> None:
    logging.disable(logging.CRITICAL)
    from math_verify import parse
    from math_verify import verify

    _limit_memory()
    import signal

    signal.signal(signal.SIGALRM, _on_alarm)

    @lru_cache(maxsize=4096)
    def parsed(text: str):
        return parse("$" + text + "$", parsing_timeout=None)

    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            if req.get("op") == "ping":
                ok = True
            else:
                soft = float(req.get("soft_s") or 0)
                if soft > 0:
                    signal.setitimer(signal.ITIMER_REAL, soft)
                try:
                    gold, pred = parsed(req["gold"]), parsed(req["pred"])
                    ok = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException:  # noqa: BLE001 - any failure (RecursionError, MemoryError, timeout) is "incorrect"
            ok = False
        out.write('{"ok": true}\n' if ok else '{"ok": false}\n')
        out.flush()


if __name__ == "__main__":
    main()
