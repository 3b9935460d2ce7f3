"""The README's code runs as written, and its test command is exactly what CI runs."""

import json
import os
import pathlib
import re
import subprocess
import sys

from tests import small_mnist

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Runs the blocks one after another in one namespace, as a reader pasting them into a
# notebook would, and names the block that failed.
RUNNER = """
import json, sys, time, traceback
namespace = {"__name__": "__main__"}
for number, block in enumerate(json.load(open(sys.argv[1])), 1):
  start = time.time()
  try:
    exec(compile(block, f"<README python block {number}>", "exec"), namespace)
  except BaseException:
    traceback.print_exc()
    sys.exit(f"README python block {number} failed")
  print(f"block {number} ok ({time.time() - start:.1f} s)", flush=True)
"""


# A block that trains may be run shorter, declared in the README right above it:
#   <!-- README test: replace 'config.steps = 500' with 'config.steps = 4' -->
# The text to replace must be in the block, so the declaration cannot go stale.
SHORTER = re.compile(r"<!-- README test: replace '(.+?)' with '(.+?)' -->\s*$")


def python_blocks(readme: str) -> list[str]:
  """The ```python blocks, with the declared replacements made."""
  blocks = []
  for match in re.finditer(r"```python\n(.*?)\n```", readme, flags=re.S):
    block = match.group(1)
    preceding = readme[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
    declared = SHORTER.match(preceding)
    if declared:
      assert declared.group(1) in block, f"README test replacement not in its block: {declared[0]}"
      block = block.replace(declared.group(1), declared.group(2))
    blocks.append(block)
  return blocks


def test_ci_runs_the_readme_test_command():
  ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
              if line and not line.startswith(("#", "set ", "cd "))]
  assert len(ci_lines) == 1, ci_lines
  blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
  assert ci_lines[0] in blocks, "README.md must show the command .ci/run runs"


def test_readme_python_blocks_run_as_written(tmp_path):
  """Every ```python block, in order, in a fresh interpreter, from a directory outside the repository.

  As written, except that a training block may declare a shorter run (``SHORTER``).

  MNIST comes the usual way, from ``$TFDS_DATA_DIR``, here a small copy
  (:mod:`tests.small_mnist`) so that evaluation takes no time; downloads are off.
  """
  blocks = python_blocks(README)
  assert len(blocks) >= 4, "the README lost its examples"
  (tmp_path / "blocks.json").write_text(json.dumps(blocks))
  env = dict(os.environ, TFDS_DATA_DIR=str(small_mnist.prepare(tmp_path / "data")),
             STN_JAX_DOWNLOAD="0", JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
  work = tmp_path / "work"
  work.mkdir()
  run = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json")], cwd=work,
                       env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
  assert run.stdout.count(" ok") == len(blocks)
