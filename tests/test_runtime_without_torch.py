"""The runtime (segrt run / Engine) must work with neither torch nor monai importable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np

from parity_util import ct_like, lps_affine, write_volume

BLOCKER = textwrap.dedent("""
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('torch', 'monai', 'onnxscript', 'torchvision'):
                raise ImportError('blocked for this test: ' + name)
            return None
    sys.meta_path.insert(0, Block())
""")


def test_run_without_torch_or_monai(small_artifact, tmp_path):
    ct = write_volume(tmp_path / "ct.nii.gz", ct_like((50, 44, 21)), lps_affine((1.5, 1.6, 3.3)))
    out = tmp_path / "labels.nii.gz"
    code = BLOCKER + textwrap.dedent(f"""
        from segrt.cli import main
        rc = main(['run', {str(small_artifact)!r}, {str(ct)!r}, '-o', {str(out)!r}, '--quiet'])
        assert 'torch' not in sys.modules and 'monai' not in sys.modules, 'imported torch/monai'
        sys.exit(rc)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert nib.load(str(out)).shape == (50, 44, 21)
    # and the blocker really blocks
    r = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "blocked" in r.stderr
    assert np.asarray(nib.load(str(out)).dataobj).max() < 256
