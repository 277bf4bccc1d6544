"""HumanEvalFix harness and code sandbox: the dataset's sanity facts, pass@k against its definition, and the
sandbox containing what untrusted code may do (each case a failure; the runs around it unaffected)."""
import json
import math
import os
from itertools import combinations
from pathlib import Path

import pytest

from ppzoo.errors import DataError
from ppzoo.eval import humanevalfix as hef
from ppzoo.eval.humanevalfix import sandbox as sandbox_module

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / hef.DATA_FILE
needs_data = pytest.mark.skipif(not DATA.is_file(), reason=f"HumanEvalFix data not found at {hef.DATA_FILE}")
CAPS = sandbox_module.capabilities()
needs_sandbox = pytest.mark.skipif(
    not CAPS["namespaces"] or CAPS["landlock_abi"] < 1,
    reason=f"this kernel cannot isolate programs (namespaces {CAPS['namespaces']}, Landlock ABI {CAPS['landlock_abi']})")


@pytest.fixture(scope="module")
def sandbox():
    return hef.Sandbox(hef.SandboxLimits(timeout=4.0, cpu_seconds=3, memory_bytes=512 << 20, max_processes=16),
                       workers=2)


# ------------------------------------------------------------------------------------------------ pass@k
def test_pass_at_k_is_the_probability_that_some_of_k_draws_passes():
    # Definition: the fraction of the C(n, k) subsets of the n samples that hold at least one passing sample.
    for n, c, k in [(5, 0, 1), (5, 2, 1), (5, 2, 2), (6, 3, 4), (7, 1, 7), (4, 4, 2)]:
        samples = [True] * c + [False] * (n - c)
        subsets = list(combinations(range(n), k))
        expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert hef.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
        assert hef.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    with pytest.raises(ValueError):
        hef.pass_at_k(2, 1, 3)


def test_score_groups_by_bug_type():
    problems = [{"bug_type": "a"}, {"bug_type": "a"}, {"bug_type": "b"}]
    table = hef.score(problems, [[True, False], [False, False], [True, True]], ks=(1, 2))
    assert table["all"]["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert table["a"]["pass@2"] == pytest.approx(0.5) and table["b"]["pass@1"] == 1.0


# ------------------------------------------------------------------------------------------- the dataset
@needs_data
def test_prompt_has_buggy_code_tests_and_instruction():
    problem = hef.load_problems(DATA)[0]
    prompt = hef.build_prompt(problem)
    assert problem["buggy_solution"] in prompt and problem["test"].strip() in prompt
    assert f"Fix bugs in {problem['entry_point']}." in prompt
    assert prompt.endswith(problem["declaration"])  # the response starts with the declaration


def test_bad_problem_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"task_id": "x", "declaration": "def f():\n"}) + "\n")
    with pytest.raises(DataError, match="missing or non-string field.*buggy_solution"):
        hef.load_problems(path)
    with pytest.raises(DataError, match="does not exist"):
        hef.load_problems(tmp_path / "absent.jsonl")


@needs_data
@needs_sandbox
def test_canonical_solutions_pass_and_buggy_ones_fail(sandbox):
    problems = hef.load_problems(DATA)
    assert len(problems) == 164
    counts = {}
    for p in problems:
        counts[p["bug_type"]] = counts.get(p["bug_type"], 0) + 1
    assert counts == {"value misuse": 44, "missing logic": 33, "excess logic": 31, "operator misuse": 25,
                      "variable misuse": 23, "function misuse": 8}
    canonical, results = hef.run_candidates(problems, [[p["canonical_solution"]] for p in problems], sandbox)
    failing = [(p["task_id"], r.stderr[-200:]) for p, ok, r in zip(problems, canonical, results) if not ok[0]]
    assert not failing, failing[:3]
    buggy, _ = hef.run_candidates(problems, [[p["buggy_solution"]] for p in problems], sandbox)
    assert sum(ok[0] for ok in buggy) == 0
    assert hef.score(problems, canonical)["all"]["pass@1"] == 1.0
    assert hef.score(problems, buggy)["all"]["pass@1"] == 0.0


# -------------------------------------------------------------------------------------------- the sandbox
def _runner_processes():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"sandbox_runner.py" in handle.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


HOSTILE = {
    "infinite loop": "while True:\n    pass\n",
    "fork bomb": (
        "import os, time\n"
        "children = 0\n"
        "while True:\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        os.setsid()\n"  # a child leaving the process group must die all the same
        "        time.sleep(120)\n"
        "        os._exit(0)\n"
        "    children += 1\n"
        "print('children', children, flush=True)\n"
        "raise SystemExit(3)\n"
    ),
    "memory hog": "blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))\n",
    "outbound socket": "import socket\nsocket.socket().connect(('93.184.216.34', 80))\n",
    "write outside its directory": "open('/tmp/ppzoo_sandbox_escape_test.txt', 'w').write('escaped')\n",
}


@needs_sandbox
def test_hostile_programs_are_contained_and_counted_as_failures(sandbox, tmp_path):
    escape = Path("/tmp/ppzoo_sandbox_escape_test.txt")
    escape.unlink(missing_ok=True)
    # A control that must pass between the hostile ones: the harness goes on and is unaffected.
    control = "import math\nopen('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n"
    programs = [p for hostile in HOSTILE.values() for p in (hostile, control)]
    results = sandbox.run_many(programs)
    by_name = dict(zip(HOSTILE, results[0::2]))
    assert all(r.passed for r in results[1::2]), [r.stderr for r in results[1::2] if not r.passed]
    for name, result in by_name.items():
        assert not result.passed, name
        assert result.seconds < sandbox.limits.timeout + 5, name
    assert by_name["infinite loop"].status == "timeout" or by_name["infinite loop"].returncode == 128 + 9
    fork_output = by_name["fork bomb"].stdout
    assert "children" in fork_output, by_name["fork bomb"].stderr
    assert int(fork_output.split()[-1]) < sandbox.limits.max_processes  # RLIMIT_NPROC stopped the bomb
    assert "MemoryError" in by_name["memory hog"].stderr
    assert "network access is disabled" in by_name["outbound socket"].stderr
    assert "Permission denied" in by_name["write outside its directory"].stderr and not escape.exists()
    assert _runner_processes() == []  # the fork bomb's sleeping, detached children are gone too


@needs_sandbox
def test_program_sees_no_network_device_and_only_its_directory_is_writable(sandbox):
    # Beneath the socket guard: the network namespace has nothing but a loopback device.
    result = sandbox.run("names = [l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]]\n"
                         "assert names == ['lo'], names\n"
                         "import os\nassert os.getcwd() != '/' and os.listdir('.')\n")
    assert result.passed, result.stderr
    home = sandbox.run(f"open({str(REPO_ROOT / 'sandbox_escape.txt')!r}, 'w')\n")
    assert not home.passed and not (REPO_ROOT / "sandbox_escape.txt").exists()


def test_missing_kernel_features_are_an_explicit_error(monkeypatch):
    monkeypatch.setattr(sandbox_module, "capabilities",
                        lambda: {"root": False, "landlock_abi": 0, "namespaces": False, "error": "unshare: EPERM"})
    with pytest.raises(hef.SandboxUnavailable, match="namespaces.*unshare: EPERM.*Landlock"):
        hef.Sandbox()
