"""The mutations of issue 18, applied one at a time to a copy of the package: each must fail a test.

    python tests/mutations_listed.py        # about 3 min on 2 cores; not collected by pytest

For every mutation (a literal replacement in one file) the repository is copied to a temporary
directory, the replacement applied (it must match exactly once), and the given tests run there
with ``PYTHONPATH`` on the copy. Prints ``mutation -> failing tests``; exits 1 if one survives.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = "tests/test_reference.py::test_engine_equals_slow_reference"
MUTATIONS = [  # (name, file, old, new, tests)
    ("reduce='square' as (sum_c g)^2", "erf/_maps.py", "lambda g: (g * g).sum(1)", "lambda g: g.sum(1) ** 2",
     [REF, "-k", "square"]),
    ("reduce='abs' as |sum_c g|", "erf/_maps.py", "lambda g: g.abs().sum(1)", "lambda g: g.sum(1).abs()",
     [REF, "-k", "abs"]),
    ("reduce='relu' after the channel sum", "erf/_maps.py", "lambda g: torch.relu(g).sum(1)",
     "lambda g: torch.relu(g.sum(1))", [REF, "-k", "relu and not relu_of_mean"]),
    ("channel= ignored by the target", "erf/_target.py", "vals = vals[:, self.channels]", "vals = vals",
     [REF, "-k", "int or list"]),
    ("captum guided backprop and deconvolution swapped", "erf/_maps.py",
     '"guided_backprop": NeuronGuidedBackprop, "deconvolution": NeuronDeconvolution',
     '"guided_backprop": NeuronDeconvolution, "deconvolution": NeuronGuidedBackprop',
     ["tests/test_captum_methods.py"]),
    ("checkpoint fingerprint ignores the model (structure, weights, code)", "erf/_options.py",
     '_NOT_FINGERPRINTED = ("progress", "until_stderr", "batch_size")',
     '_NOT_FINGERPRINTED = ("progress", "until_stderr", "batch_size", "model", "model_hash", "fingerprint")',
     ["tests/test_statistics.py", "-k", "fingerprint"]),
    ("Chan merge weights the halves equally", "erf/_stats.py", "ma + delta * (nb / n)", "ma + delta * 0.5",
     ["tests/test_statistics.py", "-k", "merge"]),
]


def run_one(name, path, old, new, tests):
    with tempfile.TemporaryDirectory() as tmp:
        for part in ("erf", "tests", "pyproject.toml", "cli.py"):
            src = os.path.join(REPO, part)
            (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, part))
        target = os.path.join(tmp, path)
        text = open(target).read()
        if text.count(old) != 1:
            return None, f"the code to mutate was not found exactly once in {path}"
        open(target, "w").write(text.replace(old, new))
        env = dict(os.environ, PYTHONPATH=tmp, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests],
                             cwd=tmp, env=env, capture_output=True, text=True)
        failed = re.findall(r"^FAILED (\S+)", out.stdout, re.M)
        return failed, out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]


def main() -> int:
    survived = 0
    for name, path, old, new, tests in MUTATIONS:
        failed, summary = run_one(name, path, old, new, tests)
        if failed is None:
            print(f"{name}: NOT APPLIED ({summary})")
            survived += 1
        elif not failed:
            print(f"{name}: SURVIVED ({summary})")
            survived += 1
        else:
            print(f"{name} -> killed by {len(failed)} tests, e.g. {failed[0]} ({summary})")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
