"""The public surface: a short list of names, and the pipelines as attributes imported on first use."""

import subprocess
import sys


def test_import_superdiff_does_not_import_diffusers_until_a_pipeline_is_asked_for():
    code = (
        "import sys, superdiff\n"
        "assert 'diffusers' not in sys.modules, 'import superdiff imported diffusers'\n"
        "from superdiff import SuperDiffPipeline, pipeline_class_for\n"
        "from superdiff.pipelines import SuperDiffPipeline as direct\n"
        "assert SuperDiffPipeline is direct and 'diffusers' in sys.modules\n"
        "assert set(superdiff.__all__) <= set(dir(superdiff)) | set(superdiff.PIPELINES)\n"
        "assert all(getattr(superdiff, name) is not None for name in superdiff.__all__)\n"
        "try:\n    superdiff.NoSuchThing\nexcept AttributeError as e:\n    assert 'NoSuchThing' in str(e)\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
