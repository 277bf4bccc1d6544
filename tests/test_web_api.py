"""The web service's API on tiny models built here: served text equals the plain Generator's, batched or
not; code fixing uses the HumanEvalFix prompt; ViLG images and captions and HelixFold structures are the
models' own outputs; and the bounds (sizes, max tokens, queue, timeout, disconnects) hold."""
import asyncio
import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ppzoo.errors import CheckpointError, ConfigError
from ppzoo.eval.humanevalfix.harness import STOP_STRINGS, fix_instruction, instruction_prompt, truncate_completion
from ppzoo.inference import SamplingConfig

from web_helpers import LiveServer, tiny_text_model, tiny_vilg_module

from apps.web.app import create_app
from apps.web.config import Limits, ModelSpec, parse_serve_config
from apps.web.models import TextModel, VilgModel, load_model

PROMPTS = ["def add(a, b):", "import os\n", "The quick brown", "x = [i for i in"]


@pytest.fixture(scope="module")
def text():
    return tiny_text_model()


def sse_events(body):
    events = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_health_and_models(text):
    with TestClient(create_app([text[0]])) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["queue"]["admitted"] == 0
        models = client.get("/models").json()["models"]
        assert [(m["name"], m["kind"], m["strategies"]) for m in models] == [("tiny", "text", ["base"])]
        page = client.get("/")
        assert page.status_code == 200 and "chat-form" in page.text
        assert client.get("/static/app.js").status_code == 200


def test_streamed_text_is_the_generators_text(text):
    served, reference = text
    with TestClient(create_app([served])) as client:
        response = client.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 20})
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.text)
    tokens = [data["text"] for event, data in events if event == "token"]
    assert len(tokens) > 1  # streamed piece by piece, not in one event
    assert events[-1][0] == "done"
    expected = reference.generate(PROMPTS[0], SamplingConfig(max_new_tokens=20))
    assert "".join(tokens) == events[-1][1]["text"] == expected


def test_kcache_option_reaches_the_decode(text):
    """KCache keeping every value row is exact; with one row per head it changes the greedy text (it is a
    real cache policy in the path, not an ignored flag)."""
    served, reference = text
    prompt = "".join(PROMPTS) * 2
    expected = reference.generate(prompt, SamplingConfig(max_new_tokens=16))
    with TestClient(create_app([served])) as client:
        def run(top_n):
            return client.post("/generate", json={"prompt": prompt, "max_new_tokens": 16, "stream": False,
                                                  "kcache_top_n": top_n}).json()["text"]
        assert run(4096) == expected
        assert run(1) != expected


def test_concurrent_requests_decode_in_one_batch_with_unchanged_text(text):
    served, reference = text

    async def fire(limits):
        app = create_app([served], limits)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            answers = await asyncio.gather(*[
                client.post("/generate", json={"prompt": p, "max_new_tokens": 12, "stream": False}) for p in PROMPTS])
        app.state.scheduler.close()
        return [a.json() for a in answers], app.state.scheduler.stats

    expected = [reference.generate(p, SamplingConfig(max_new_tokens=12)) for p in PROMPTS]
    batched, stats = asyncio.run(fire(Limits(batch_window_ms=200)))
    assert [a["text"] for a in batched] == expected
    assert [a["batch_size"] for a in batched] == [4] * 4 and stats["batches"] == 1
    alone, stats = asyncio.run(fire(Limits(batching=False)))
    assert [a["text"] for a in alone] == expected
    assert [a["batch_size"] for a in alone] == [1] * 4 and stats["batches"] == 4


def test_codefix_uses_the_humanevalfix_prompt(text):
    served, reference = text
    code = "def add(a, b):\n    return a - b\n"
    # A CCT-trained model is the default for code fixing (the same weights here, so the text is the same).
    cct = TextModel("cct", "<built in the test>", module=served.module, tokenizer=served.tokenizer, module_name="CCT")
    with TestClient(create_app([served, cct])) as client:
        answer = client.post("/codefix", json={"code": code, "max_new_tokens": 24}).json()
        assert answer["model"] == "cct"
        assert client.post("/codefix", json={"code": "def broken(:"}).status_code == 400
        assert client.post("/codefix", json={"code": "x = 1\n"}).status_code == 400
    prompt = instruction_prompt(fix_instruction(code, "add"), "def add(a, b):\n")
    body = truncate_completion(reference.generate(prompt, SamplingConfig(max_new_tokens=24,
                                                                         stop_strings=STOP_STRINGS)))
    assert answer["entry_point"] == "add" and answer["body"] == body
    assert answer["fixed_code"] == "def add(a, b):\n" + body


def test_vilg_image_and_caption_are_the_models_outputs():
    from ppzoo.data.images import load_image_file, to_uint8
    from ppzoo.models.ernie_vilg import ImageSampling, caption_images, text_to_image

    module = tiny_vilg_module()
    with TestClient(create_app([VilgModel("vilg", "<built in the test>", module)])) as client:
        answer = client.post("/text-to-image", json={"prompt": "two small red circles", "candidates": 2,
                                                     "seed": 3}).json()
        png = base64.b64decode(answer["png_base64"])
        caption = client.post("/caption", json={"image_base64": answer["png_base64"]}).json()["caption"]
        bad = client.post("/caption", json={"image_base64": "bm90IGFuIGltYWdl"})
        assert bad.status_code == 400 and "image_base64 does not hold" in bad.json()["detail"]
        assert client.post("/fold", json={"fasta": "MKV"}).status_code == 503  # no folding model loaded
    expected = to_uint8(text_to_image(module, ["two small red circles"],
                                      ImageSampling(num_candidates=2, seed=3))["images"])[0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), expected)
    assert caption == caption_images(module, load_image_file(io.BytesIO(png))[None])[0]


def test_fold_returns_pdb_with_plddt_of_the_model(tmp_path):
    from ppzoo.config import load_config
    from ppzoo.data.protein.raw_features import single_sequence_features
    from ppzoo.inference.folding import FoldingOptions, fold, predict
    from ppzoo.registry import MODULES
    import paddle

    import ppzoo.models  # noqa: F401  (registers HelixFold)
    from apps.web.models import FoldingModel
    from conftest import REPO_ROOT

    cfg = load_config(REPO_ROOT / "configs" / "helixfold" / "tiny.yaml")
    paddle.seed(0)
    module = MODULES.get("HelixFold")(cfg.Model, None)
    module.eval()
    predict_fn = lambda example, recycles: predict(module, example, recycles)  # noqa: E731
    sequence = "MQIFVKTLTGKT"
    with TestClient(create_app([FoldingModel("fold", "<built in the test>", cfg, predict_fn, 0)])) as client:
        answer = client.post("/fold", json={"fasta": f">frag test\n{sequence}\n"}).json()
        assert client.post("/fold", json={"fasta": ">x\nMQ1Z*"}).status_code == 400
    assert answer["name"] == "frag" and answer["sequence"] == sequence
    ca = [line for line in answer["pdb"].splitlines() if line.startswith("ATOM") and line[12:16].strip() == "CA"]
    assert len(ca) == len(sequence) == len(answer["plddt"])
    np.testing.assert_allclose([float(line[60:66]) for line in ca], answer["plddt"], atol=0.01)
    best = fold(predict_fn, cfg, single_sequence_features(sequence), "frag", FoldingOptions(recycles=0))[0]
    np.testing.assert_allclose(answer["plddt"], best["plddt"], atol=0.01)
    assert answer["mean_plddt"] == pytest.approx(best["mean_plddt"])


def test_bad_requests_are_clear_4xx(text):
    served, _ = text
    with TestClient(create_app([served], Limits(max_new_tokens=64, max_body_bytes=2000))) as client:
        def status(payload, path="/generate"):
            return client.post(path, json=payload).status_code
        assert status({"prompt": "x", "max_new_tokens": 65}) == 422
        assert status({"prompt": ""}) == 422
        assert status({"prompt": "x" * 3000}) == 413
        assert status({"prompt": "x", "model": "nope"}) == 404
        answer = client.post("/generate", json={"prompt": "x", "strategy": "verified"})
        assert answer.status_code == 400 and "RecycleGPT" in answer.json()["detail"]
        assert status({"prompt": "x"}, "/text-to-image") == 503  # no ViLG model loaded
    with TestClient(create_app([served], Limits(max_new_tokens=8000))) as client:
        answer = client.post("/generate", json={"prompt": "x" * 1000, "max_new_tokens": 4000})
        assert answer.status_code == 400 and "context" in answer.json()["detail"]


def block_worker(app):
    """Occupy the worker with a call that waits for the returned event (sets up a busy server)."""
    release = threading.Event()

    async def submit():
        return app.state.scheduler.submit_call(release.wait)
    asyncio.run(submit())
    return release


def test_full_queue_answers_429_and_timeouts_503(text):
    served, _ = text
    app = create_app([served], Limits(max_pending=2, request_timeout=0.5))
    with TestClient(app) as client:
        release = block_worker(app)
        started = time.time()
        timed_out = client.post("/generate", json={"prompt": "x", "stream": False})
        assert timed_out.status_code == 503 and time.time() - started < 5
        assert client.get("/health").json()["queue"]["admitted"] == 1  # the timed-out request freed its slot
        client.post("/generate", json={"prompt": "x", "stream": False})  # fills the queue until it times out
        release2 = block_worker(app)  # the worker's second slot
        full = client.post("/generate", json={"prompt": "x"})
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        release.set()
        release2.set()
        deadline = time.time() + 10
        while client.get("/health").json()["queue"]["admitted"] and time.time() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json()["queue"]["admitted"] == 0
        assert client.post("/generate", json={"prompt": "x", "max_new_tokens": 2, "stream": False}).status_code == 200


def test_client_disconnect_frees_its_slot_and_stops_the_decode():
    served, _ = tiny_text_model(endless=True)
    app = create_app([served], Limits(max_new_tokens=4000))
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/generate", json={"prompt": "a", "max_new_tokens": 4000}) as response:
            lines = response.iter_lines()  # kept: a dropped line iterator closes the stream
            assert next(lines) == "event: token"
            assert client.get("/health").json()["queue"]["admitted"] == 1
        # The connection is closed after one token of 4000: the slot frees and the batch stops decoding.
        deadline = time.time() + 20
        while time.time() < deadline and (app.state.scheduler.stats["abandoned_batches"] < 1
                                          or client.get("/health").json()["queue"]["admitted"]):
            time.sleep(0.05)
        assert client.get("/health").json()["queue"]["admitted"] == 0
        assert app.state.scheduler.stats["abandoned_batches"] == 1


def test_serve_config_errors_name_the_key():
    config = parse_serve_config({"models": [{"name": "a", "checkpoint": "out/a"}], "limits": {"max_batch": 4}},
                                "s.yaml")
    assert config.models[0].path == "out/a" and config.limits.max_batch == 4
    for bad, words in [({"models": [{"name": "a"}]}, "exactly one of checkpoint"),
                       ({"limits": {"max_batchs": 4}}, "max_batchs"),
                       ({"limits": {"max_batch": 0}}, "max_batch must be a positive"),
                       ({"models": [{"name": "a", "export": "x"}, {"name": "a", "export": "y"}]}, "used twice")]:
        with pytest.raises(ConfigError, match=words):
            parse_serve_config(bad, "s.yaml")
    with pytest.raises(CheckpointError, match="does not exist. Train it"):
        load_model(ModelSpec(name="gone", checkpoint="output/no_such_run"))


def test_recycle_gpt_strategies_are_served():
    """A RecycleGPT model offers its strategies; verified decoding reproduces base greedy (the method's
    guarantee) and alternating decoding is RecycleGenerator's own alternation."""
    import paddle

    from generation_helpers import CharTokenizer
    from ppzoo.inference.recycle import make_generator
    from ppzoo.models.recycle_gpt.model import RecycleGPTConfig
    from ppzoo.models.recycle_gpt.module import RecycleGPTModule

    paddle.seed(0)
    module = RecycleGPTModule(RecycleGPTConfig(vocab_size=CharTokenizer.vocab_size, hidden_size=64, num_layers=2,
                                               num_heads=4, num_kv_heads=2, intermediate_size=128,
                                               max_position_embeddings=256, initializer_range=0.2))
    module.eval()
    served = TextModel("recycle", "<built in the test>", module=module, tokenizer=CharTokenizer(),
                       module_name="RecycleGPT")
    sampling = SamplingConfig(max_new_tokens=16)
    with TestClient(create_app([served])) as client:
        assert client.get("/models").json()["models"][0]["strategies"] == ["base", "alternating", "verified"]
        texts = {s: client.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 16, "stream": False,
                                                   "strategy": s}).json()["text"] for s in ("base", "verified",
                                                                                           "alternating")}
    base = make_generator(module, CharTokenizer(), "base").generate(PROMPTS[0], sampling)
    alternating = make_generator(module, CharTokenizer(), "alternating").generate(PROMPTS[0], sampling)
    assert texts["base"] == texts["verified"] == base
    assert texts["alternating"] == alternating


def test_exported_model_serves_the_eager_models_text(tmp_path):
    """A model directory from the exporter (Paddle Inference) loads from the serve config's `export:` entry
    and serves, batched, the text the eager model generates."""
    import paddle

    import ppzoo
    from ppzoo.data.corpus import builtin_texts
    from ppzoo.data.tokenizer import train_byte_level_bpe
    from ppzoo.inference import Generator
    from ppzoo.inference.export import export_language_model
    from ppzoo.registry import MODULES
    from conftest import TINY_CONFIG

    cfg = ppzoo.load_config(TINY_CONFIG, ["Model.vocab_size=300", "Model.hidden_size=64", "Model.num_layers=2",
                                          "Model.num_heads=4", "Model.num_kv_heads=2", "Model.intermediate_size=128",
                                          "Model.max_position_embeddings=128", "Model.initializer_range=0.2"])
    paddle.seed(0)
    module = MODULES.get(cfg.model_module)(cfg.Model, None)
    module.eval()
    tokenizer = train_byte_level_bpe(builtin_texts("train", 20_000), 300)
    export_language_model(module, cfg, tokenizer, tmp_path / "model")
    served = load_model(ModelSpec(name="exported", export=str(tmp_path / "model")))
    assert served.describe()["strategies"] == ["base"] and not served.supports_kcache

    async def fire(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            answers = await asyncio.gather(*[client.post("/generate", json={"prompt": p, "max_new_tokens": 12,
                                                                            "stream": False}) for p in PROMPTS[:2]])
        app.state.scheduler.close()
        return [a.json() for a in answers]

    answers = asyncio.run(fire(create_app([served], Limits(batch_window_ms=200))))
    eager = Generator(module.language_model(), tokenizer)
    assert [a["text"] for a in answers] == [eager.generate(p, SamplingConfig(max_new_tokens=12)) for p in PROMPTS[:2]]
    assert [a["batch_size"] for a in answers] == [2, 2]
