"""CPU test environment only: stand-ins for what SGLang imports but a CPU box cannot have.

Put this folder on PYTHONPATH (conftest.py and the CPU server launcher do) so that the
spawned scheduler and detokenizer processes get the same stand-ins:
- `torchvision`: SGLang imports `torchvision.io.decode_jpeg` unconditionally and no CPU
  build of torchvision exists for torch 2.13; the stand-in raises if anything calls it.
- SGLang's `RotaryEmbedding.__init__` imports vLLM custom ops on a platform it does not
  recognise; marking its module as CPU skips that branch (the flag is read nowhere else).
"""

import importlib.abc
import importlib.machinery
import sys
import types


class _StandIn:
    """Any torchvision attribute: hashable, nests, and raises only when called."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, name):
        return _StandIn(f"{self._name}.{name}")._attr(name)

    def _attr(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name}: torchvision stand-in (CPU tests), not available")

    def __repr__(self):
        return f"<torchvision stand-in {self._name}>"


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves `torchvision` and its submodules to empty modules (tests only)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+tangram-cpu-standin"
        module.__getattr__ = lambda name: _StandIn(f"{spec.name}.{name}")._attr(name)
        return module

    def exec_module(self, module):
        pass


class _RotaryCpuFlag(importlib.abc.MetaPathFinder):
    """After SGLang's rotary-embedding base module loads, mark it as running on CPU."""

    TARGET = "sglang.srt.layers.rotary_embedding.base"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _TorchvisionStandIn):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                spec.loader = _FlagAfterExec(spec.loader)
                return spec
        return None


class _FlagAfterExec(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        module._is_cpu = True


if not any(isinstance(f, _TorchvisionStandIn) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionStandIn())
    sys.meta_path.insert(0, _RotaryCpuFlag())
