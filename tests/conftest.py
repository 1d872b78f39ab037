"""Suite-wide settings: offline, small vLLM CPU cache, and a skip audit.

Every skip must carry a reason; skips whose reason is not an accepted hardware limit (no CUDA GPU)
fail the run, so a green CI never hides skipped integration tests. Accepted reasons are the
regular expression in ``M1_ALLOWED_SKIPS``.
"""

import os
import re

import pytest

from axolotl_m1.demo_step import OFFLINE_ENV as FRAMEWORK_OFFLINE_ENV  # light module: os, yaml

OFFLINE_ENV = {**FRAMEWORK_OFFLINE_ENV, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
for key, value in OFFLINE_ENV.items():
    os.environ.setdefault(key, value)

DEFAULT_ALLOWED_SKIPS = r"(?i)cuda|gpu|subprocess|child process|run in this process|TRITON_INTERPRET=1 child"
_skips: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    allowed = re.compile(os.environ.get("M1_ALLOWED_SKIPS", DEFAULT_ALLOWED_SKIPS))
    by_reason: dict[str, int] = {}
    for _, reason in _skips:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    terminalreporter.section("skip audit")
    if not _skips:
        terminalreporter.write_line("no tests skipped")
    for reason, count in sorted(by_reason.items(), key=lambda kv: -kv[1]):
        verdict = "accepted" if allowed.search(reason) else "NOT ACCEPTED"
        terminalreporter.write_line(f"{count:4d} x [{verdict}] {reason}")
    config._m1_bad_skips = [s for s in _skips if not allowed.search(s[1])]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    bad = getattr(session.config, "_m1_bad_skips", None)
    if bad is None:  # terminal summary not reached yet: audit here
        allowed = re.compile(os.environ.get("M1_ALLOWED_SKIPS", DEFAULT_ALLOWED_SKIPS))
        bad = [s for s in _skips if not allowed.search(s[1])]
    if bad and session.exitstatus == 0:
        session.exitstatus = 1
