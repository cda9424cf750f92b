"""The README's two commands stay true: CI runs exactly its test command."""
import os
import re

from conftest import ROOT


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```bash\n(.+?)\n```", text, re.S)


def test_ci_runs_exactly_the_readme_test_command():
    cmds = _readme_commands()
    test_cmd = [c for c in cmds if "pytest" in c]
    assert len(test_cmd) == 1, cmds
    ci = open(os.path.join(ROOT, ".ci", "run")).read().strip().splitlines()
    assert ci[-1].strip() == test_cmd[0].strip()


def test_readme_main_job_uses_an_existing_config():
    main = [c for c in _readme_commands() if "imprag_jax.train" in c][0]
    cfg = re.search(r"--config (\S+)", main).group(1)
    assert os.path.exists(os.path.join(ROOT, cfg))
