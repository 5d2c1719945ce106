"""Checks a wheel built by a plain `pip wheel .` / `pip install .` (isolated, no torch):
one wheel for every Python and torch (tag py3-none-<platform>), holding the CUDA library
with sm_80 and sm_90 code and PTX, and the C ABI only.  Usage: check_wheel.py WHEEL"""
import os
import subprocess
import sys
import tempfile
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(path):
    from benchmarks.targets import tool
    name = os.path.basename(path)
    assert "-py3-none-linux_" in name, f"wheel tag: {name}"
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert "convmixer_ext/_cmx_cuda.so" in names, names
        with tempfile.TemporaryDirectory() as d:
            lib = z.extract("convmixer_ext/_cmx_cuda.so", d)
            listing = subprocess.run([tool("cuobjdump"), "--list-elf", "--list-ptx", lib],
                                     capture_output=True, text=True, check=True).stdout
            nm = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True,
                                text=True, check=True).stdout
    for want in ("sm_80.cubin", "sm_90.cubin", "sm_90.ptx"):
        assert want in listing, f"{want} missing from the CUDA library:\n{listing}"
    exported = {ln.split()[-1] for ln in nm.splitlines() if " T " in ln}
    assert exported and all(s.startswith("cmx_") for s in exported), sorted(exported)
    print(f"{name}: py3-none wheel; CUDA library with sm_80, sm_90 and compute_90 PTX; "
          f"{len(exported)} C ABI entry points")


if __name__ == "__main__":
    main(sys.argv[1])
