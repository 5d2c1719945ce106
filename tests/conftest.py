"""Test configuration.

Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at collection time.

``CONVMIXER_EXT_REQUIRE_BACKENDS`` (``make test`` sets ``all-kernels``: the kernel
backends of this device) names backends that must be available: a missing one fails the
session instead of silently skipping its tests.
"""
import collections
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _interpreter_shortcuts():
    """Two pieces of Triton's interpreter (3.6 to 3.8) redo the same work at every call;
    both are answered once here (the suite's time, not its results: every kernel test still
    compares the interpreter's results with the twin). Where the interpreter is not shaped
    like this (another Triton), nothing is changed.

    - It maps the triton.language modules a function's globals hold onto its interpreted
      builtins when a kernel's grid starts (undone when it ends), and again at every call of
      a @jit device function. For a device function whose module the grid's mapping already
      covers, that second time finds every builtin mapped (a mapped one is no longer marked
      builtin) but still scans the modules for them: a sixth of the interpreter's time where
      a helper is called per tap. The scan is skipped for a module already mapped in the
      running grid; the first call from another module's globals (e.g.
      triton.language.standard's, which maps triton.language.core) is mapped as Triton does.
    - It builds a table of numpy dtypes at every lookup of a type's (about once per
      interpreted operation); the answer depends on the element type alone, and is kept.
    """
    if "triton" not in sys.modules:  # (not installed, or CONVMIXER_EXT_NO_TRITON)
        return
    from triton.runtime import interpreter as ti
    patch = getattr(ti, "_patch_lang", None)
    grid_cls = getattr(ti, "GridExecutor", None)
    scope_cls = getattr(ti, "_LangPatchScope", None)
    if None not in (patch, grid_cls, scope_cls) and not hasattr(patch, "_shortcut"):
        mapped = []  # per running grid: the ids of the globals whose modules it mapped

        def once_per_launch(fn):
            key = id(fn.__globals__)
            if not isinstance(sys._getframe(1).f_locals.get("self"), grid_cls):
                if mapped and key in mapped[-1]:  # a device function's call, module mapped
                    return scope_cls()
                if mapped:
                    mapped[-1].add(key)
                return patch(fn)
            scope = patch(fn)
            restore = scope.restore

            def restore_and_end():
                mapped.pop()
                restore()
            scope.restore = restore_and_end
            mapped.append({key})
            return scope
        once_per_launch._shortcut = True
        ti._patch_lang = once_per_launch

    np_dtype = getattr(ti, "_get_np_dtype", None)
    tl = ti.tl
    if np_dtype is not None and not hasattr(np_dtype, "_shortcut") and \
            hasattr(tl, "block_type") and hasattr(tl, "pointer_type"):
        table = {}

        def np_dtype_of(tt_dtype):
            elem = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
            if isinstance(elem, tl.pointer_type):  # (unhashable)
                return np_dtype(elem)
            got = table.get(elem)
            if got is None:
                got = table[elem] = np_dtype(elem)
            return got
        np_dtype_of._shortcut = True
        ti._get_np_dtype = np_dtype_of


import convmixer_ext  # noqa: E402
from convmixer_ext._env import triton_interpreter  # noqa: E402
from convmixer_ext.backends import backend_reason  # noqa: E402

if triton_interpreter():
    _interpreter_shortcuts()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# under pytest-xdist (the GPU run): the workers share the cores, each with its share of
# threads (a worker with every core's threads oversubscribes the machine many times over)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))

# tests compare with float64 references: the GPU's TF32 matmuls/convolutions (on by default
# for cuDNN) would be a different computation, so they are off unless a test turns them on
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def kernel_backends():
    """Kernel backends (not the PyTorch ones) that can run on DEVICE here."""
    names = ("cuda", "triton") if DEVICE == "cuda" else ("triton", "cuda_emu")
    return [n for n in names if backend_reason(n, DEVICE) is None]


def model_kernel_size(*backends):
    """The kernel size of the whole-model and torch.compile tests: 3 where Triton's
    interpreter runs one of ``backends`` (its time grows with k * k: a tap is interpreted
    operations on whole blocks), 5 elsewhere. What those tests check (autocast's casts, the
    folded BN2 chain, tracing) does not depend on k; the pass and layer tests cover the
    kernel sizes."""
    interpreted = DEVICE == "cpu" and any(b.startswith("triton") for b in backends)
    return 3 if interpreted else 5


def all_backends():
    """The twin ("torch"), PyTorch's own ops ("eager", auto's choice without kernels) and
    every kernel backend available on DEVICE."""
    return ["torch", "eager"] + kernel_backends()


def pytest_sessionstart(session):
    required = [b for b in os.environ.get("CONVMIXER_EXT_REQUIRE_BACKENDS", "").split(",") if b]
    if required == ["all-kernels"]:  # every kernel backend of this device
        required = ["cuda", "triton"] if DEVICE == "cuda" else ["triton", "cuda_emu"]
    missing = {b: backend_reason(b, DEVICE) for b in required
               if backend_reason(b, DEVICE) is not None}
    if missing:
        raise pytest.UsageError(f"required backends unavailable on {DEVICE}: {missing}")


def pytest_runtest_logreport(report):
    """``CONVMIXER_EXT_FAILURE_LOG=path``: each failure's id and traceback is appended to
    ``path`` as it happens (by the controller under xdist), so a run stopped at a time limit
    still says what failed and why."""
    path = os.environ.get("CONVMIXER_EXT_FAILURE_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} [{report.when}]\n{report.longreprtext[-2500:]}\n\n")


def pytest_report_header(config):
    return [f"convmixer_ext device={DEVICE} backends={convmixer_ext.available_backends()}"]


# Under `make test` (pytest-xdist, --dist loadscope --no-loadscope-reorder) tests are handed
# out one by one in this order: the real-target compiles first (their module fixture compiles
# every Triton kernel for two targets, the longest single piece of work, so it does not start
# last and hold the run's end), then files by test count, the static report last. Two sets
# of files are each one scope (pytest_xdist_make_scheduler below), run by one process:
# - the real-target compiles and the static report: their module fixtures run once, and
#   the report's compiles find that process's Triton cache filled;
# - the files of emulated CUDA blocks: the emulator runs a block's threads as OS threads, so
#   two processes running them at once oversubscribed the cores (those files took 2.6x
#   their time).
# Whole files handed out (--dist loadfile) left a process idle for a minute at the end,
# waiting on the longest file.
_FIRST, _LAST = ("test_targets.py",), ("test_static.py",)


def pytest_collection_modifyitems(config, items):
    count = collections.Counter(item.path.name for item in items)

    def rank(item):
        name = item.path.name
        return (0 if name in _FIRST else 2 if name in _LAST else 1, -count[name], name)
    items.sort(key=rank)  # stable: a file's own order is kept


# The files run by one process each (above).
_ONE_SCOPE = {"test_targets.py": "real-target-compiles",
              "test_static.py": "real-target-compiles",
              "test_cuda_paths.py": "emulated-blocks",
              "test_cuda_tensor_cores.py": "emulated-blocks"}


def _scope(nodeid):
    return _ONE_SCOPE.get(nodeid.split("::")[0].rsplit("/", 1)[-1], nodeid)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadscope's scopes as drawn above: each test its own, but _ONE_SCOPE's sets of
    files (pytest-xdist's loadgroup would do it with a mark; with pytest 9 it ignored the
    mark here)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return _scope(nodeid)
    return Scheduling(config, log)
