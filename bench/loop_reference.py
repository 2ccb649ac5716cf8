"""The sampler as it stood before issue 24's rewrite, read from this repository's git history.

``load()`` writes the five modules of commit :data:`COMMIT` (sampler, combiners, expressions,
estimator, particles) into a temporary package and imports it, so ``bench/loop_equivalence.py`` can
run the old and the new ``sample_sde`` on the same seeds without a copy of the old code in the tree.
The old modules import the rest of the library (``models``, ``processes``) from today's ``superdiff``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

#: The last commit before the rewrite (the reference the equivalence check holds the sampler to).
COMMIT = "9541c97"
MODULES = ("combine", "density", "expressions", "particles", "sampling")
_REPO = Path(__file__).resolve().parents[1]


def available(commit: str = COMMIT) -> bool:
    """Whether this checkout's history holds ``commit`` (a shallow clone may not)."""
    probe = subprocess.run(["git", "-C", str(_REPO), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    return probe.returncode == 0


def load(commit: str = COMMIT) -> ModuleType:
    """The package ``loop_reference_<commit>`` with the old modules as attributes (``.sampling``, ...)."""
    name = f"loop_reference_{commit}"
    if name in sys.modules:
        return sys.modules[name]
    if not available(commit):
        raise RuntimeError(f"commit {commit} is not in this checkout's history (a shallow clone?): "
                           "fetch it (git fetch --unshallow) to compare against the sampler before the rewrite")
    root = Path(tempfile.mkdtemp(prefix="superdiff-loop-reference-"))
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text(f'"""superdiff\'s sampler modules at commit {commit}."""\n')
    for module in MODULES:
        source = subprocess.run(["git", "-C", str(_REPO), "show", f"{commit}:superdiff/{module}.py"],
                                capture_output=True, text=True, check=True).stdout
        # Only the sampler imports modules outside the five; take those from today's library.
        for outside in ("models", "processes"):
            source = source.replace(f"from .{outside} import", f"from superdiff.{outside} import")
        (package / f"{module}.py").write_text(source)
    sys.path.insert(0, str(root))
    reference = importlib.import_module(name)
    for module in MODULES:
        setattr(reference, module, importlib.import_module(f"{name}.{module}"))
    return reference
