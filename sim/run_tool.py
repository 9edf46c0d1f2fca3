"""Runs one of the vendor's Python tools (path in argv[1], its arguments after) the way they
work here:
- `import tpu_mlir` sets up PATH, PYTHONPATH, TPUC_ROOT, the PPL_* variables of the attention
  kernel's JIT build, and LD_LIBRARY_PATH with the wheel's bundled glibc 2.35 in it, which
  crashes tpuc-opt and model_tool ("stack smashing detected"): $SYSTEM_LIBC_DIR (symlinks to
  the system's own libc, libm, libpthread) goes back in front of it;
- the converter's ONNX optimizer imports torch at module level but only calls
  `torch.tensor(x).numpy()`: without a real torch, a stand-in is put on the path, after
  onnxruntime_extensions has loaded (that package probes torch.autograd when it finds a torch).
  llm_convert.py (`make bmodel`) needs the real one."""
import importlib.util
import os
import runpy
import sys

import onnxruntime_extensions  # noqa: F401  (before the stand-in becomes visible)
import tpu_mlir  # noqa: F401  (the environment, once per process)

os.environ["LD_LIBRARY_PATH"] = os.environ["SYSTEM_LIBC_DIR"] + os.pathsep + os.environ["LD_LIBRARY_PATH"]
if importlib.util.find_spec("torch") is None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "stand-in"))
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
