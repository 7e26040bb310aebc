"""Before and after a migration: `preflight` (go / no-go) and `verify` (schema, validity, integrity).

Each check is shaped like a collector: its SQL at the top of its module, a function that runs it on an
observer-safe session and returns `CheckResult`s (PASS / WARN / FAIL, the measured value, the limit and
what to do). `result.py` holds the shared result types and the checks file `serve` exports.
"""
