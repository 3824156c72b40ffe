"""A missing optional package must skip exactly the tests that need it (not collected by pytest).

    python tests/check_optional_deps.py torchvision            # the whole suite, torchvision hidden
    python tests/check_optional_deps.py nbformat tests/test_notebook.py

Runs pytest in a subprocess where importing PACKAGE fails (a meta-path blocker: the package stays
installed, no venv is needed), and checks:

1. as many tests run as are collected with the package present: no module-level skip hides the
   other tests of a file (a skipped module counts as one test);
2. no test fails or errors: every test that needs the package skips;
3. every skip that names the package is one of those tests; the others skip in both runs
   (and are listed).

The tests skipped for the package are then exactly the tests that need it (each reached its own
``importorskip``/lazy import of the package), and their number is printed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

BLOCKED_RUN = r"""
import importlib.abc, sys
NAME = sys.argv[1]
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == NAME or fullname.startswith(NAME + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by check_optional_deps)", name=fullname)
        return None
sys.meta_path.insert(0, Block())
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


def _collected(args: list[str]) -> int:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         capture_output=True, text=True)
    return sum(1 for line in out.stdout.splitlines() if "::" in line)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    name, args = argv[0], argv[1:] or ["tests"]
    want = _collected(args)
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "run.xml")
        subprocess.run([sys.executable, "-c", BLOCKED_RUN, name, "-q", "-p", "no:cacheprovider", "-rs",
                        f"--junitxml={xml}", *args])
        cases = ET.parse(xml).getroot().iter("testcase")
        ran, bad, for_pkg, other = 0, [], [], []
        for case in cases:
            ran += 1
            test = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                bad.append(test)
            skip = case.find("skipped")
            if skip is not None:
                reason = skip.get("message", "")
                (for_pkg if name in reason else other).append((test, reason))
    print(f"\n{name} hidden: {ran} tests ran (collected with it: {want}), {len(bad)} failed/errored, "
          f"{len(for_pkg)} skipped naming {name}, {len(other)} skipped for other reasons")
    for test, reason in other:
        print(f"  other skip: {test}: {reason[:120]}")
    for test in bad:
        print(f"  FAILED: {test}")
    ok = ran == want and not bad
    print("OK: the skipped tests are exactly those that need", name if ok else "", "" if ok else "-> NOT OK")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
