"""The README's test command is exactly what CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
              if line and not line.startswith(("#", "set ", "cd "))]
  assert len(ci_lines) == 1, ci_lines
  blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
  assert ci_lines[0] in blocks, "README.md must show the command .ci/run runs"
