"""The image probe's pure parts: the fingerprint that tells two builds of one hpcddf version
apart, the programs a stage starts, what an answer lacks. The probe run inside a real image
is in tests/integration/test_charliecloud.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hpcddf
from hpcddf.engine import imageprobe as ip


def test_the_fingerprint_follows_the_sources_not_their_place(tmp_path: Path) -> None:
    copy = tmp_path / "hpcddf"
    shutil.copytree(Path(hpcddf.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert ip.fingerprint(copy) == ip.fingerprint()
    (copy / "engine" / "state.py").write_text((copy / "engine" / "state.py").read_text() + "\n# changed\n")
    assert ip.fingerprint(copy) != ip.fingerprint()
    (copy / "notes.txt").write_text("not Python: not part of it")
    assert len(ip.fingerprint(copy)) == 16


def test_needed_commands_are_each_program_once_in_order() -> None:
    argvs = [("DDF.py", "a.parset"), ("kMS.py", "--MSName", "x"), ("DDF.py", "b"), (), ("python3", "-m", "x")]
    assert ip.needed_commands(argvs) == ["DDF.py", "kMS.py", "python3"]


def test_problems_name_missing_programs_and_another_hpcddf() -> None:
    here = ip.probe([])
    ok = {**here, "commands": {"DDF.py": "/usr/local/bin/DDF.py"}}
    assert ip.problems(ok, here) == []
    missing = {**here, "commands": {"DDF.py": None, "kMS.py": "/usr/local/bin/kMS.py"}}
    assert ip.problems(missing, here) == ["DDF.py is not in the image"]
    older = {**ok, "fingerprint": "0123456789abcdef"}
    assert ip.problems(older, here) == [f"the image has hpcddf {here['version']} (0123456789abcdef), "
                                        f"the job hpcddf {here['version']} ({here['fingerprint']})"]


def test_the_answer_is_the_last_json_line_of_the_log(capsys) -> None:  # noqa: ANN001
    assert ip.main(["python3"]) == 0
    answer = capsys.readouterr().out
    log = '["ch-run", "..."]\nsome warning\n' + answer + "\n"
    got = ip.last_json(log)
    assert got == json.loads(answer) and got["commands"]["python3"]
    assert ip.last_json("no answer\n{not json") is None
