"""Nebula-I cross-cluster channel: mutual TLS, authenticated frames (tamper / replay / truncation rejected and
logged), reconnect and resume, compression identities, the outer optimizer, and two clusters through the
Engine on loopback."""
import logging
import os
import ssl
import sys
import threading

import numpy as np
import paddle
import pytest
import yaml

from conftest import REPO_ROOT, free_port, last_json_line, read_metrics
from ppzoo.distributed.cross_cluster.channel import ChannelClosed, FrameCodec, SecureChannel, decode_message, \
    encode_message
from ppzoo.distributed.cross_cluster.compression import ErrorFeedbackCompressor, choose_compression, compress, \
    decompress, dequantize_int8, quantize_int8
from ppzoo.distributed.cross_cluster.sync import NesterovOuterOptimizer
from ppzoo.distributed.cross_cluster.wan import DelayRelay

sys.path.insert(0, str(REPO_ROOT / "tools"))
from make_certs import make_certs  # noqa: E402


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    paths = make_certs(str(directory), ["english", "code"])
    rogue = make_certs(str(directory / "rogue"), ["intruder"])  # signed by a CA nobody trusts
    paths.update(intruder_cert=rogue["intruder_cert"], intruder_key=rogue["intruder_key"])
    return paths


def channel(certs, role, address, who, timeout=20.0):
    return SecureChannel(role, address, certs[f"{who}_cert"], certs[f"{who}_key"], certs["ca_cert"],
                         reconnect_timeout=timeout, io_timeout=30.0)


def connected_pair(certs, dial=None):
    """(server, client, relay-or-None): connected over loopback, the client through a relay if `dial` is one."""
    server = channel(certs, "server", "127.0.0.1:0", "english")
    port = server.listen()
    relay = DelayRelay(("127.0.0.1", 0), ("127.0.0.1", port), delay=0.01) if dial == "relay" else None
    target = relay.address[1] if relay else port
    client = channel(certs, "client", f"127.0.0.1:{target}", "code")
    thread = threading.Thread(target=server.connect)
    thread.start()
    client.connect()
    thread.join()
    return server, client, relay


def close_all(*things):
    for thing in things:
        if thing is not None:
            thing.close()


def test_messages_round_trip_over_mutual_tls(certs):
    server, client, _ = connected_pair(certs)
    try:
        arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.array([5, -1], dtype=np.int32)}
        client.send({"step": 3}, arrays)
        meta, got = server.recv()
        assert meta == {"step": 3}
        for name in arrays:
            np.testing.assert_array_equal(got[name], arrays[name])
            assert got[name].dtype == arrays[name].dtype
        # Both directions at once with messages larger than the socket buffers (exchange must not deadlock).
        big = np.random.default_rng(0).standard_normal(2_000_000).astype(np.float32)
        result = {}
        thread = threading.Thread(target=lambda: result.update(s=server.exchange({"from": "s"}, {"x": big})))
        thread.start()
        meta_c, got_c = client.exchange({"from": "c"}, {"x": -big})
        thread.join()
        assert meta_c == {"from": "s"} and result["s"][0] == {"from": "c"}
        np.testing.assert_array_equal(got_c["x"], big)
        np.testing.assert_array_equal(result["s"][1]["x"], -big)
        assert server.session_id == client.session_id and server.codec.key == client.codec.key
        assert client.bytes_sent > 8_000_000 and server.bytes_received == client.bytes_sent
    finally:
        close_all(client, server)


def test_peer_without_a_federation_certificate_is_refused(certs, caplog):
    server = SecureChannel("server", "127.0.0.1:0", certs["english_cert"], certs["english_key"], certs["ca_cert"],
                           reconnect_timeout=2.0)
    port = server.listen()
    intruder = SecureChannel("client", f"127.0.0.1:{port}", certs["intruder_cert"], certs["intruder_key"],
                             certs["ca_cert"], reconnect_timeout=2.0)
    server_errors = []

    def serve():
        try:
            server.connect()
        except (ChannelClosed, ssl.SSLError) as error:
            server_errors.append(error)

    with caplog.at_level(logging.WARNING, logger="ppzoo.nebula"):
        thread = threading.Thread(target=serve)
        thread.start()
        with pytest.raises((ChannelClosed, ssl.SSLError)):
            intruder.connect()
        thread.join()
    assert server_errors, "the server must not have accepted a session"
    assert server.codec is None and intruder.codec is None  # no session was ever established
    assert "refused" in caplog.text and "CERTIFICATE_VERIFY_FAILED" in caplog.text
    close_all(server, intruder)


def test_tampered_and_replayed_frames_are_rejected_and_logged(certs, caplog):
    server, client, _ = connected_pair(certs)
    try:
        with caplog.at_level(logging.WARNING, logger="ppzoo.nebula"):
            client.send({"n": 1}, {"x": np.ones(4, np.float32)})
            first_frame = client.unacked[1]  # not yet acknowledged: the server has sent nothing back
            assert server.recv()[0] == {"n": 1}
            # A frame with one payload byte flipped, sealed under the real key (an on-path modification).
            forged = bytearray(client.codec.seal(2, client.codec.next_send, encode_message({"n": 666})))
            forged[30] ^= 0x01
            client.inject(bytes(forged))
            client.inject(first_frame)  # a replay of an already delivered frame
            client.send({"n": 2}, {"x": np.full(4, 2, np.float32)})
            meta, arrays = server.recv()
        assert meta == {"n": 2}  # the stream goes on with the authentic next message
        np.testing.assert_array_equal(arrays["x"], np.full(4, 2, np.float32))
        reasons = [reason for reason, _seq in server.codec.rejected]
        assert len(reasons) == 2 and reasons[0].startswith("tampered") and reasons[1].startswith("replayed")
        assert "tampered" in caplog.text and "replayed" in caplog.text
    finally:
        close_all(client, server)


def test_frame_codec_rejects_forged_tags_and_gaps():
    sender, receiver = FrameCodec(b"k" * 32), FrameCodec(b"k" * 32)
    outsider = FrameCodec(b"x" * 32)
    frames = [sender.seal_data(encode_message({"i": i})) for i in range(3)]

    def parts(frame):
        return frame[:25], frame[25:-32], frame[-32:]

    assert receiver.verify(*parts(outsider.seal_data(encode_message({"i": 0})))) is None  # wrong key
    assert receiver.verify(*parts(frames[1])) is None  # skips frame 1: a gap
    assert receiver.verify(*parts(frames[0]))[1] == 1
    assert receiver.verify(*parts(frames[1]))[1] == 2
    assert receiver.verify(*parts(frames[1])) is None  # replay
    assert decode_message(parts(frames[2])[1])[0] == {"i": 2}
    assert [r.split()[0] for r, _ in receiver.rejected] == ["tampered", "out", "replayed"]


def test_truncated_frame_then_resume_delivers_every_message_once(certs, caplog):
    server, client, relay = connected_pair(certs, dial="relay")
    try:
        client.send({"n": 1})
        assert server.recv()[0] == {"n": 1}
        payload = np.random.default_rng(1).standard_normal(50_000).astype(np.float32)
        with caplog.at_level(logging.WARNING, logger="ppzoo.nebula"):
            relay.cut_after(40_000)  # the link dies ~40 kB (a few TLS records) into the next frame
            client.send({"n": 2}, {"x": payload})  # written: the relay swallows what it does not forward
            got = {}

            def serve():  # the other leader: sees a truncated frame, reconnects, gets the retransmission
                got["msg"] = server.recv()
                server.send({"n": "ack"})

            listener = threading.Thread(target=serve)
            listener.start()
            reply = client.recv()  # notices the cut, redials, resumes, retransmits, then gets the answer
            listener.join(30)
        meta, arrays = got["msg"]
        assert meta == {"n": 2}
        np.testing.assert_array_equal(arrays["x"], payload)
        assert reply[0] == {"n": "ack"}
        assert server.reconnects == 1 and client.reconnects == 1
        assert "truncated" in caplog.text and "resumed" in caplog.text
        # And after a plain dropped link, the session carries on in both directions.
        client.drop_link()
        got = {}
        listener = threading.Thread(target=lambda: got.update(msg=server.recv()))  # a leader is always reading
        listener.start()
        client.send({"n": 3})
        listener.join(30)
        assert got["msg"][0] == {"n": 3}
        server.send({"n": 4})
        assert client.recv()[0] == {"n": 4}
        assert server.reconnects == client.reconnects == 2
        assert all(not reason.startswith(("tampered", "replayed")) for reason, _ in server.codec.rejected)
    finally:
        close_all(client, server, relay)


# ----------------------------------------------------------------------------------------- compression
@pytest.mark.parametrize("scheme", ["int8", "topk", "topk_int8"])
def test_error_feedback_loses_nothing(scheme):
    """sum of what was sent + the residual == sum of the inputs, after any number of rounds."""
    rng = np.random.default_rng(0)
    compressor = ErrorFeedbackCompressor(1000, scheme, topk_ratio=0.05)
    inputs, sent_total = np.zeros(1000, np.float64), np.zeros(1000, np.float64)
    for _ in range(20):
        vector = rng.standard_normal(1000).astype(np.float32) * rng.uniform(0.1, 10)
        message, sent = compressor.compress(vector)
        np.testing.assert_array_equal(decompress(message, 1000), sent)  # the receiver reconstructs `sent`
        inputs += vector
        sent_total += sent
    np.testing.assert_allclose(sent_total + compressor.residual, inputs, rtol=0, atol=1e-3)
    assert np.abs(compressor.residual).max() > 0  # it is lossy: the identity is not trivial


def test_int8_and_topk_are_what_they_say():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(1000).astype(np.float32)
    x[7] = 50.0  # an outlier only affects its own block's scale
    codes, scales = quantize_int8(x)
    error = np.abs(dequantize_int8(codes, scales) - x)
    block_scale = np.repeat(scales, 256)[:1000]
    assert (error <= block_scale / 2 + 1e-6).all()
    assert codes.dtype == np.int8 and scales.size == 4
    message = compress(x, "topk", 0.01)
    assert set(message["indices"].tolist()) == set(np.argsort(-np.abs(x))[:10].tolist())
    assert sum(a.nbytes for a in compress(x, "topk_int8", 0.01).values()) < x.nbytes / 50


def test_compression_follows_the_bandwidth():
    raw = 4_000_000  # 1M float32 values
    assert choose_compression(raw, 1e9, 0.5) == ("none", 1.0)  # a LAN sends exact values
    assert choose_compression(raw, 4e6, 0.5) == ("int8", 1.0)
    scheme, ratio = choose_compression(raw, 50e6 / 8 / 10, 0.5)  # 5 Mbit/s
    assert scheme == "topk_int8" and 0 < ratio < 0.25
    assert choose_compression(raw, 50e6 / 8 / 100, 0.5)[1] < ratio  # slower link, fewer values


def test_outer_nesterov_matches_torch_sgd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = rng.standard_normal(50).astype(np.float32)
    reference = torch.nn.Parameter(torch.tensor(params.copy()))
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    outer = NesterovOuterOptimizer(0.7, 0.9, 50)
    for _ in range(5):
        grad = rng.standard_normal(50).astype(np.float32)
        params = outer.step(params, grad)
        reference.grad = torch.tensor(grad)
        sgd.step()
    np.testing.assert_allclose(params, reference.detach().numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- two clusters, one host
def test_two_clusters_train_through_the_engine(tmp_path, write_config, certs):
    """diloco: the synced layers end identical in both clusters, the rest stays each cluster's own."""
    from nebula_helpers import check_ok, cluster_sections, final_weights, finish, start_cluster

    port = free_port()
    common = {"sync_every": 5, "sync_params": ["model.model.layers.*"], "compression": "int8", "overlap_steps": 2}
    english = write_config(tmp_path / "english", **cluster_sections(
        certs, "english", "server", f"127.0.0.1:{port}", "english", tmp_path / "english" / "out", **common))
    code = write_config(tmp_path / "code", **cluster_sections(
        certs, "code", "client", f"127.0.0.1:{port}", "code", tmp_path / "code" / "out", **common))
    summaries = check_ok(finish([start_cluster(english), start_cluster(code)]))
    weights = [final_weights(s) for s in summaries]
    for name in weights[0]:
        if name.startswith("model.model.layers."):
            np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)
    assert not np.array_equal(weights[0]["model.model.embed_tokens.weight"], weights[1]["model.model.embed_tokens.weight"])
    for summary, out_dir in zip(summaries, ("english", "code")):
        assert summary["wan_syncs"] == 4 and summary["wan_bytes"] > 0
        records = read_metrics(tmp_path / out_dir / "out")
        assert records[-1]["eval_loss"] < records[0]["loss"]  # it learns
    # int8 pseudo-gradients: about a quarter of the float32 subset per sync and direction (+ probe, framing).
    subset = sum(v.size for k, v in weights[0].items() if k.startswith("model.model.layers."))
    probe = 2 * (1 << 20)  # the bandwidth probe, once each way
    per_sync = (summaries[0]["wan_bytes"] - probe) / summaries[0]["wan_syncs"]
    assert 2 * subset * 1.0 < per_sync < 2 * subset * 1.2


def test_data_parallel_baseline_keeps_clusters_identical(tmp_path, write_config, certs):
    """data_parallel: gradients averaged across the clusters every step, so both models stay the same."""
    from nebula_helpers import check_ok, cluster_sections, final_weights, finish, start_cluster

    port = free_port()
    common = {"mode": "data_parallel"}
    english = write_config(tmp_path / "english", **cluster_sections(
        certs, "english", "server", f"127.0.0.1:{port}", "english", tmp_path / "english" / "out", max_steps=6,
        **common))
    code = write_config(tmp_path / "code", **cluster_sections(
        certs, "code", "client", f"127.0.0.1:{port}", "code", tmp_path / "code" / "out", max_steps=6, **common))
    summaries = check_ok(finish([start_cluster(english), start_cluster(code)]))
    weights = [final_weights(s) for s in summaries]
    for name in weights[0]:
        np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)
    total = sum(v.size for v in weights[0].values())
    assert summaries[0]["wan_bytes"] > 6 * 2 * 4 * total  # the full float32 gradient, both ways, every step


# ------------------------------------------------------------------------- phase two: translation + KD
def test_translation_finetune_distils_from_the_pretrained_model(tmp_path, write_config):
    """Pretrain (code), then fine-tune on docstring -> signature pairs with KD from the pretrained model: the
    student starts as the teacher, so the KL term is exactly 0 at step 1 and positive once it moves."""
    from conftest import run_tool

    pretrain = write_config(tmp_path / "pretrain", Engine={"max_steps": 8},
                            Data={"Train": {"dataset": "BuiltinLanguage", "language": "code", "max_chars": 100_000},
                                  "Eval": {"dataset": "BuiltinLanguage", "language": "code", "split": "validation",
                                           "max_chars": 20_000}})
    done = run_tool("train", ["-c", pretrain])
    assert done.returncode == 0, done.stderr[-3000:]
    pretrained = tmp_path / "pretrain" / "out"
    finetune = write_config(
        tmp_path / "finetune", Engine={"max_steps": 6, "init_from": str(pretrained)},
        Model={"module": "NebulaTranslation", "teacher": str(pretrained), "kd_weight": 0.5, "temperature": 2.0})
    sections = yaml.safe_load(finetune.read_text())  # Data.Train / Eval replaced whole, not merged
    sections["Data"].update(Train={"dataset": "DocToSignature", "split": "train", "max_pairs": 400},
                            Eval={"dataset": "DocToSignature", "split": "validation"})
    finetune.write_text(yaml.safe_dump(sections, sort_keys=False))
    done = run_tool("train", ["-c", finetune])
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(tmp_path / "finetune" / "out")
    assert records[0]["kd"] == 0.0 and records[0]["loss"] == pytest.approx(records[0]["ce"], rel=1e-6)
    assert all(r["kd"] > 0 for r in records[1:])
    assert records[-1]["ce"] < records[0]["ce"]
    summary = last_json_line(done.stdout)
    weights = paddle.load(str(summary["checkpoint"]) + "/model.mp0.pdparams")
    assert not any(name.startswith("_teacher") for name in weights)  # the teacher is not checkpointed


def test_distillation_kl_matches_torch():
    torch = pytest.importorskip("torch")
    from ppzoo.methods.nebula.translation import distillation_kl

    rng = np.random.default_rng(0)
    teacher, student = rng.standard_normal((2, 5, 11)).astype(np.float32), rng.standard_normal((2, 5, 11)).astype(np.float32)
    labels = np.array([[-100, 3, 4, -100, 1], [2, -100, -100, 5, 6]])
    ours = float(distillation_kl(paddle.to_tensor(teacher), paddle.to_tensor(student), paddle.to_tensor(labels), 2.0))
    keep = torch.tensor(labels != -100)
    t, s = torch.tensor(teacher)[keep] / 2.0, torch.tensor(student)[keep] / 2.0
    reference = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                                           reduction="batchmean") * 4.0
    assert ours == pytest.approx(float(reference), rel=1e-5)


def test_nebula_configs_load_and_bad_settings_are_named():
    from ppzoo.config import load_config
    from ppzoo.distributed.cross_cluster.sync import check_config
    from ppzoo.errors import ConfigError

    english = load_config(REPO_ROOT / "configs" / "nebula" / "pretrain_english.yaml")
    code = load_config(REPO_ROOT / "configs" / "nebula" / "pretrain_code.yaml")
    translate = load_config(REPO_ROOT / "configs" / "nebula" / "translate_kd.yaml")
    assert english.Distributed.cross_cluster.role == "server" and code.Distributed.cross_cluster.role == "client"
    assert english.Distributed.cross_cluster.sync_params == code.Distributed.cross_cluster.sync_params
    assert code.Data.Train.args.language == "code" and english.Data.Train.args.language == "english"
    assert translate.model_module == "NebulaTranslation" and not translate.Distributed.cross_cluster.enable

    class Env:
        mp_size = pp_size = sharding_size = ep_size = 1

    cfg = english.Distributed.cross_cluster
    for key, value, message in (("mode", "gossip", "mode='gossip'"), ("compression", "zip", "compression='zip'"),
                                ("overlap_steps", 10, "overlap_steps")):
        bad = type(cfg)(**{**cfg.__dict__, key: value})
        with pytest.raises(ConfigError, match=message):
            check_config(bad, Env())
    with pytest.raises(ConfigError, match="is not a file"):
        SecureChannel("client", "127.0.0.1:1", "/nonexistent.pem", "/nonexistent.key", "/nonexistent.pem")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        SecureChannel("client", "nowhere", "/a", "/b", "/c")


def test_make_certs_command(tmp_path):
    from conftest import run_tool
    from cryptography import x509

    done = run_tool("make_certs", ["--out", tmp_path / "certs", "--clusters", "east", "west"])
    assert done.returncode == 0, done.stderr
    written = last_json_line(done.stdout)
    ca = x509.load_pem_x509_certificate(open(written["ca_cert"], "rb").read())
    for cluster in ("east", "west"):
        cert = x509.load_pem_x509_certificate(open(written[f"{cluster}_cert"], "rb").read())
        assert cert.issuer == ca.subject and cert.subject.rfc4514_string().startswith(f"CN={cluster}")
        cert.verify_directly_issued_by(ca)
    assert oct(os.stat(written["east_key"]).st_mode & 0o777) == "0o600"
    refused = run_tool("make_certs", ["--out", tmp_path / "x", "--clusters", "a", "a"])
    assert refused.returncode != 0 and "distinct" in refused.stderr
