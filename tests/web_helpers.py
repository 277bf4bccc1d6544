"""What the web tests share: tiny models built in the test (no training), wrapped as the app serves them,
and a live uvicorn server for tests that need real sockets (disconnects, the browser)."""
import socket
import threading
import time
import types

import paddle

from ppzoo.inference.generate import Generator

from generation_helpers import CharTokenizer, small_chuxin

from apps.web.models import TextModel

CONTEXT = 4096


class EndlessCharTokenizer(CharTokenizer):
    """No end-of-sequence token: a decode runs to max_new_tokens (for tests that need a long decode)."""

    eos_id = None


def tiny_text_model(name="tiny", endless=False):
    """A seeded random ChuXin over CharTokenizer served as a text model, and a plain Generator over the same
    weights (the reference the served text must equal)."""
    model = small_chuxin(CONTEXT)
    module = types.SimpleNamespace(language_model=lambda: model)  # the Module interface make_generator uses
    tokenizer = EndlessCharTokenizer() if endless else CharTokenizer()
    return TextModel(name, "<built in the test>", module=module, tokenizer=tokenizer, module_name="ChuXin"), \
        Generator(model, tokenizer)


def tiny_vilg_module():
    from ppzoo.models.ernie_vilg import ErnieViLGConfig, ErnieViLGModule, VQVAEConfig

    paddle.seed(0)
    module = ErnieViLGModule(ErnieViLGConfig(vqvae=VQVAEConfig(channels=8, code_dim=8, codebook_size=32),
                                             hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    module.eval()
    return module


class LiveServer:
    """uvicorn serving `app` on a free local port in a background thread."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("uvicorn did not start within 30 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
