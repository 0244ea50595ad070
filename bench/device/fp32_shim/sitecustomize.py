"""GPU end-to-end fp32 comparison only (bench/device/e2e.sh, greedy phase).

SGLang 0.5.17's CUDA forwards of its custom ops call kernels without fp32 support
(`sgl_kernel.rmsnorm` fails to "dispatch data type Float"). With this folder on
PYTHONPATH every `MultiPlatformOp` (RMSNorm, SiluAndMul, rotary embedding, ...) runs its
torch-native forward instead. Both the stock and the tangram server of the comparison run
with it, so their outputs differ only where their attention differs.
"""

import importlib.abc
import sys

TARGET = "sglang.srt.layers.utils.multi_platform"


class _NativeDispatch(importlib.abc.MetaPathFinder):
    """After SGLang's multi-platform op module loads, dispatch every op to forward_native."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                spec.loader = _PatchAfterExec(spec.loader)
                return spec
        return None


class _PatchAfterExec(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        module.MultiPlatformOp.dispatch_forward = lambda op: op.forward_native


if not any(isinstance(f, _NativeDispatch) for f in sys.meta_path):
    sys.meta_path.insert(0, _NativeDispatch())
