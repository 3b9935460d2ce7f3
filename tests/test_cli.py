"""The ``stn-jax`` command (stn_jax.cli) and training from a non-editable install.

The install test builds a wheel from a copy of the project's packaging files,
installs it (no dependencies) into a fresh virtual environment that reuses
this environment's packages, and trains for two steps on the synthetic
digits from another directory with the installed ``stn-jax`` script.
"""

import os
import pathlib
import shutil
import site
import subprocess
import sys
import zipfile

from stn_jax import cli, configs

ROOT = pathlib.Path(__file__).resolve().parents[1]
# No PYTHONPATH: the installed wheel, not a source tree on the path, must be what runs.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
ENV["JAX_PLATFORMS"] = "cpu"


def run(command, cwd, timeout=240):
  return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                        env=ENV)


def test_help_lists_every_config_and_only_existing_flags(capsys):
  assert cli.main(["stn-jax", "--help"]) == 0
  text = capsys.readouterr().out
  for family in configs.FAMILIES:
    line = next(line for line in text.splitlines() if line.startswith(f"  {family}: "))
    assert line.split(": ", 1)[1].split() == list(configs.family_module(family).NAMES)
  for flag in cli.TRAIN_FLAGS:
    assert f"--{flag}:" in text and flag in cli.FLAGS
  assert cli.main(["stn-jax", "list"]) == 0
  assert capsys.readouterr().out.split() == configs.names()
  assert cli.main(["stn-jax", "fit"]) == 2
  assert "unknown command 'fit'; use 'train' or 'list'" in capsys.readouterr().err


def test_train_needs_a_named_config_and_a_workdir(tmp_path):
  family_only = run([sys.executable, "-m", "stn_jax.cli", "train", "--config=distorted_mnist",
                     f"--workdir={tmp_path / 'run'}"], cwd=tmp_path)
  assert family_only.returncode != 0
  assert "config 'distorted_mnist' names no config" in family_only.stderr
  assert "st_cnn_affine_rts" in family_only.stderr   # the names to choose from
  no_workdir = run([sys.executable, "-m", "stn_jax.cli", "train",
                    "--config=distorted_mnist:cnn_r"], cwd=tmp_path)
  assert no_workdir.returncode == 2
  assert "train needs --config=<family>:<name> and --workdir=DIR" in no_workdir.stderr
  assert os.listdir(tmp_path) == []


def build_wheel(out: pathlib.Path) -> pathlib.Path:
  """A wheel built from a copy of what the package is made of (no stale build/ of the tree)."""
  source = out / "source"
  source.mkdir()
  for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
    shutil.copy(ROOT / name, source / name)
  shutil.copytree(ROOT / "stn_jax", source / "stn_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.so"))
  built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--no-index", "-q", "-w", str(out / "dist"), str(source)], cwd=out)
  assert built.returncode == 0, built.stderr[-3000:]
  return next((out / "dist").glob("stn_jax-*.whl"))


def test_wheel_installs_and_trains_from_another_directory(tmp_path):
  wheel = build_wheel(tmp_path)
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
  assert {n.split("/")[0] for n in names} == {"stn_jax", wheel.name.split("-py3")[0] + ".dist-info"}
  assert "stn_jax/configs/distorted_mnist.py" in names
  assert {"stn_jax/native/bilinear.cc", "stn_jax/native/convolution.cc",
          "stn_jax/native/parallel.h"} <= set(names)
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
  assert "License-Expression: Apache-2.0" in metadata
  assert "stn-jax = stn_jax.cli:main" in entry_points
  # A fresh environment: the wheel, plus this environment's packages on the path (no
  # downloads). Its .pth files are not run, so the editable install of stn_jax stays out.
  venv = tmp_path / "venv"
  made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
  assert made.returncode == 0, made.stderr
  purelib = pathlib.Path(subprocess.check_output(
      [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
      text=True).strip())
  (purelib / "reuse_test_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
  installed = run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                   "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=tmp_path)
  assert installed.returncode == 0, installed.stderr[-3000:]
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  command = str(venv / "bin" / "stn-jax")
  listed = run([command, "list"], cwd=elsewhere)
  assert listed.returncode == 0 and "distorted_mnist:st_cnn_affine_rts" in listed.stdout.split()
  trained = run([command, "train", "--config=distorted_mnist:fcn_r",
                 "--workdir=run", "--config.data=synthetic", "--config.synthetic_examples=64",
                 "--config.steps=2", "--config.batch_size=16", "--config.eval_batch_size=16",
                 "--config.figure_examples=0", "--config.progress=false"], cwd=elsewhere)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert "done: test error" in trained.stdout
  assert (elsewhere / "run" / "results.json").exists()
  where = run([venv / "bin" / "python", "-c", "import stn_jax; print(stn_jax.__file__)"],
              cwd=elsewhere)
  assert where.stdout.strip().startswith(str(purelib))   # the installed copy, not the tree
  assert not (purelib / "experiments").exists()
