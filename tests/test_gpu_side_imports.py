"""The GPU check carries only what fits in 64 MiB (FlashInfer, not SGLang or xgrammar), so the
executor, kernels, speculative generators and offline engine must import without either."""

from __future__ import annotations

import subprocess
import sys

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('sglang', 'xgrammar'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
import faser_sgl.offline_engine, faser_sgl.speculative.frontier, faser_sgl.speculative.early_exit
import faser_sgl.managers.token_generator, faser_sgl.managers.logprobs, faser_sgl.kernels
import faser_sgl.executor.model_runner
assert not any(m.split('.')[0] in ('sglang', 'xgrammar') for m in sys.modules)
print('ok')
"""


def test_engine_imports_without_sglang_and_xgrammar():
    proc = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
