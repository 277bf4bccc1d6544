"""Nebula-I over an emulated WAN: one cluster in each of two network namespaces joined by a veth pair shaped
to 50 Mbit/s with tc (token bucket), plus 50 ms one-way delay from a delaying relay. The "english" cluster
runs two processes (data parallel with gloo inside the namespace), the "code" cluster one."""
import os
import signal
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, read_metrics, subprocess_env
from nebula_helpers import check_ok, cluster_sections, final_weights, finish, start_cluster
from ppzoo.distributed.cross_cluster.wan import WanLink, namespaces_allowed, start_relay

sys.path.insert(0, str(REPO_ROOT / "tools"))
from make_certs import make_certs  # noqa: E402

ALLOWED, WHY_NOT = namespaces_allowed()
pytestmark = pytest.mark.skipif(not ALLOWED, reason=f"WAN emulation needs network namespaces: {WHY_NOT}")

SERVER_PORT, RELAY_PORT = 7800, 7801
ONE_WAY_DELAY = 0.05


def _kill_group(process):
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.communicate()


@pytest.fixture
def wan(request):
    """The shaped link and the relay; torn down (processes killed, namespaces deleted) even on failure."""
    link = WanLink(rate="50mbit", subnet=77 + os.getpid() % 100)
    started = []

    def cleanup():
        for process in started:
            _kill_group(process)
        link.teardown()

    request.addfinalizer(cleanup)
    link.setup()
    started.append(start_relay(link, RELAY_PORT, SERVER_PORT, ONE_WAY_DELAY, env=subprocess_env(), cwd=REPO_ROOT))
    link.started = started
    return link


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(str(tmp_path_factory.mktemp("certs")), ["english", "code"])


def test_two_clusters_over_the_emulated_wan(tmp_path, wan, write_config, certs):
    common = {"sync_every": 5, "sync_params": ["model.model.layers.*"], "compression": "auto",
              "comm_budget_s": 0.005, "overlap_steps": 2}
    code = write_config(tmp_path / "code", **cluster_sections(
        certs, "code", "server", f"127.0.0.1:{SERVER_PORT}", "code", tmp_path / "code" / "out", **common))
    english_sections = cluster_sections(certs, "english", "client", f"{wan.ips[1]}:{RELAY_PORT}", "english",
                                        tmp_path / "english" / "out", **common)
    english_sections["Distributed"]["dp_degree"] = 2
    english_sections["Global"] = {"global_batch_size": 8, "micro_batch_size": 4}  # 4 per rank, 8 per cluster
    english = write_config(tmp_path / "english", **english_sections)
    processes = [start_cluster(code, wrap=wan.command(1, [])),
                 start_cluster(english, wrap=wan.command(0, []), nproc=2, log_dir=tmp_path / "english" / "logs")]
    wan.started.extend(processes)
    results = finish(processes, timeout=400)
    if results[1][0] != 0:
        logs = "".join(open(p).read()[-3000:] for p in sorted((tmp_path / "english" / "logs").glob("workerlog.*")))
        pytest.fail(f"the english cluster failed:\n{results[1][2][-2000:]}\n{logs}")
    code_summary = check_ok(results[:1])[0]
    english_record = read_metrics(tmp_path / "english" / "out")[-1]
    code_record = read_metrics(tmp_path / "code" / "out")[-1]

    # The link is what was asked for: ~50 Mbit/s and >= 2 x 50 ms round trip (measured by the leaders).
    for record in (english_record, code_record):
        assert 2 * ONE_WAY_DELAY <= record["wan_rtt_s"] < 2 * ONE_WAY_DELAY + 0.15
        assert 5 < record["wan_bandwidth_mbit"] < 60
        # The budget is too small for float32 over 50 Mbit/s: compression was chosen from the bandwidth.
        assert record["wan_scheme"] in ("int8", "topk_int8")
        assert record["wan_syncs"] == 4 and record["wan_rejected"] == 0
    # The synced layers are identical across the WAN; the embeddings stay each cluster's own.
    code_weights = final_weights(code_summary)
    english_dir = sorted((tmp_path / "english" / "out").glob("step_*"))[-1]
    english_weights = final_weights({"checkpoint": str(english_dir)})
    for name in code_weights:
        if name.startswith("model.model.layers."):
            np.testing.assert_array_equal(code_weights[name], english_weights[name], err_msg=name)
    assert not np.array_equal(code_weights["model.model.embed_tokens.weight"],
                              english_weights["model.model.embed_tokens.weight"])
