"""Snapshot of the TensorRT execution provider's option names in a published onnxruntime-gpu wheel.

The options are parsed in C++ (``tensorrt_execution_provider_info.cc``), so they are read as the
NUL-terminated strings of the provider library in the wheel. The wheel (about 250 MB) is downloaded
once with ``pip download --no-deps``; the snapshot is committed as
``tests/vendor/onnxruntime-gpu-<version>-tensorrt-ep.json`` and read by
``tests/test_vendor_conformance.py``.

    python scripts/extract_ort_tensorrt_options.py --version 1.31.1 > tests/vendor/onnxruntime-gpu-1.31.1-tensorrt-ep.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

LIBRARY = "onnxruntime/capi/libonnxruntime_providers_tensorrt.so"
# Option keys are whole strings in the library: trt_* plus the three shared with the CUDA EP.
OPTION = re.compile(rb"(?<=\x00)(trt_[a-z0-9_]+|device_id|has_user_compute_stream|user_compute_stream)(?=\x00)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True)
    parser.add_argument("--wheel", type=Path, help="an already downloaded wheel")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d",
                            scratch, f"onnxruntime-gpu=={args.version}"], check=True)
            wheel = next(Path(scratch).glob("onnxruntime_gpu-*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        with zipfile.ZipFile(wheel) as archive:
            library = archive.read(LIBRARY)
    options = sorted({match.decode() for match in OPTION.findall(library)})
    json.dump({"distribution": "onnxruntime-gpu", "version": args.version, "wheel": wheel.name, "sha256": digest,
               "source": f"option-name strings of {LIBRARY} in the published wheel",
               "tensorrt_execution_provider_options": options}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
