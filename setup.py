"""Build hooks that pyproject.toml cannot express: the C cores of BPE training and encoding, and shipping
the top-level ``conf/`` tree inside the wheel (as ``lmrun/conf``) for non-editable installs."""
import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self):
        super().run()
        src = Path(__file__).parent / "conf"
        dst = Path(self.build_lib) / "lmrun" / "conf"
        if src.is_dir() and not self.editable_mode:
            shutil.copytree(src, dst, dirs_exist_ok=True)


setup(
    cmdclass={"build_py": BuildPyWithConf},
    ext_modules=[
        Extension(
            "lmrun.tokenizer._bpe",
            sources=["lmrun/tokenizer/_bpe.c"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,  # without a C compiler lmrun falls back to the pure-Python trainer
        ),
        Extension(
            "lmrun.tokenizer._encode",
            sources=["lmrun/tokenizer/_encode.c"],
            depends=["lmrun/tokenizer/_unicode_classes.h"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,  # without a C compiler Tokenizer.encode uses the pure-Python encoder (same ids)
        ),
    ],
)
