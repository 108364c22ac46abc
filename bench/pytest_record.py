"""pytest plugin of ``bench.gpu_check`` (``pytest -p bench.pytest_record``): appends one JSON line
per event to the file named by ``$SPARSEKERN_GPU_CHECK_RESULT`` as it happens — the number of
tests collected, each test's start, each outcome — so a run killed at its time limit or by a
crash keeps what it got (``gpu_check.summarize_tests`` reads the lines)."""
import json
import os


def _write(entry):
    with open(os.environ["SPARSEKERN_GPU_CHECK_RESULT"], "a") as f:
        f.write(json.dumps(entry) + "\n")


def _message(report):
    crash = getattr(report.longrepr, "reprcrash", None)
    return (crash.message if crash is not None else report.longreprtext)[-500:]


def pytest_collectreport(report):
    if report.failed:
        _write({"nodeid": report.nodeid, "when": "collect", "outcome": "failed", "message": _message(report)})


def pytest_collection_finish(session):
    _write({"collected": len(session.items)})


def pytest_runtest_logstart(nodeid, location):
    _write({"nodeid": nodeid, "when": "start"})


def pytest_runtest_logreport(report):
    if report.when == "call" or not report.passed:  # setup/teardown only when they fail or skip
        entry = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome}
        if report.failed:
            entry["message"] = _message(report)
        _write(entry)
