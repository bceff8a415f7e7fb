import subprocess
import sys


def test_preprocess_package_never_imports_torch():
    code = (
        "import pkgutil, importlib, sys, preprocess;"
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(preprocess.__path__, 'preprocess.')];"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
