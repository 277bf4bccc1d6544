"""Property-based requests generated from the app's OpenAPI schema (schemathesis): whatever a client sends
that the schema allows or not, the server answers without a 5xx (bad input is a 4xx naming the problem)."""
import paddle
import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a dev requirement (requirements-dev.txt)")

from ppzoo.config import load_config  # noqa: E402
from ppzoo.inference.folding import predict  # noqa: E402
from ppzoo.registry import MODULES  # noqa: E402

import ppzoo.models  # noqa: E402,F401  (registers HelixFold)
from conftest import REPO_ROOT  # noqa: E402
from web_helpers import tiny_text_model, tiny_vilg_module  # noqa: E402

from apps.web.app import create_app  # noqa: E402
from apps.web.config import Limits  # noqa: E402
from apps.web.models import FoldingModel, VilgModel  # noqa: E402


def build_app():
    cfg = load_config(REPO_ROOT / "configs" / "helixfold" / "tiny.yaml")
    paddle.seed(0)
    folder = MODULES.get("HelixFold")(cfg.Model, None)
    folder.eval()
    models = [tiny_text_model()[0], VilgModel("vilg", "<test>", tiny_vilg_module()),
              FoldingModel("fold", "<test>", cfg, lambda example, recycles: predict(folder, example, recycles), 0)]
    # Small bounds keep every generated request quick; going over them must still be a 4xx.
    return create_app(models, Limits(max_new_tokens=8, max_residues=12, max_prompt_chars=2000))


schema = schemathesis.openapi.from_asgi("/openapi.json", build_app())


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r}: {response.status_code} " \
                                       f"{response.text}"
