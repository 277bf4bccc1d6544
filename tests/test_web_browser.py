"""The page in a real browser (Debian's chromium driven by Playwright through its executable path): a prompt
typed into the chat box streams in piece by piece and ends as the model's text; the code-fix box, the image
panel and the structure view (coloured by pLDDT) show what the API returns."""
import shutil

import pytest

from ppzoo.inference import SamplingConfig

from web_helpers import LiveServer, tiny_text_model, tiny_vilg_module

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable on PATH (Debian: apt-get install "
                                                          "chromium); Playwright drives the system browser")


@pytest.fixture(scope="module")
def served():
    from ppzoo.config import load_config
    from ppzoo.inference.folding import predict
    from ppzoo.registry import MODULES
    import paddle

    import ppzoo.models  # noqa: F401  (registers HelixFold)
    from apps.web.app import create_app
    from apps.web.models import FoldingModel, VilgModel
    from conftest import REPO_ROOT

    text, reference = tiny_text_model()
    cfg = load_config(REPO_ROOT / "configs" / "helixfold" / "tiny.yaml")
    paddle.seed(0)
    folder = MODULES.get("HelixFold")(cfg.Model, None)
    folder.eval()
    models = [text, VilgModel("vilg", "<test>", tiny_vilg_module()),
              FoldingModel("fold", "<test>", cfg, lambda example, recycles: predict(folder, example, recycles), 0)]
    with LiveServer(create_app(models)) as server:
        yield server, reference


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(served[0].url)
        page.wait_for_selector("#chat-model option", state="attached")
        yield page
        browser.close()


def test_chat_streams_the_models_text(served, page):
    _, reference = served
    prompt = "def add(a, b):"
    # Count the updates of the completion as they happen: streamed text arrives in many pieces.
    page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver(() => { window.updates += 1; })
            .observe(document.getElementById('chat-log'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#chat-max", "24")
    page.fill("#chat-input", prompt)
    page.click("#chat-send")
    page.wait_for_function("document.querySelector('#chat-log .meta') && "
                           "document.querySelector('#chat-log .meta').textContent.includes('tokens')", timeout=60000)
    shown = page.text_content("#chat-log .completion")
    assert shown == reference.generate(prompt, SamplingConfig(max_new_tokens=24))
    assert page.evaluate("window.updates") > 5


def test_codefix_image_and_structure_panels(page):
    page.click("#codefix-send")
    page.wait_for_function("document.getElementById('codefix-output').textContent.startsWith('def add(a, b):')",
                           timeout=60000)

    page.click("#image-form button")
    page.wait_for_function("document.getElementById('image-output').naturalWidth === 32", timeout=60000)
    page.click("#caption-send")  # captions the image just drawn
    page.wait_for_function("document.getElementById('caption-output').textContent.length > 0", timeout=60000)
    assert "error" not in page.text_content("#caption-output").lower()

    page.click("#fold-send")
    page.wait_for_function("document.getElementById('fold-summary').textContent.includes('mean pLDDT')",
                           timeout=120000)
    # The structure view drew the trace in the pLDDT band colours (AF2's palette), nothing else.
    colours = page.evaluate("""() => {
        const c = document.getElementById('fold-view');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const seen = new Set();
        for (let i = 0; i < px.length; i += 4) if (px[i + 3] === 255) seen.add(`${px[i]},${px[i+1]},${px[i+2]}`);
        return [...seen];
    }""")
    bands = [(0, 83, 214), (101, 203, 243), (255, 219, 19), (255, 125, 69)]
    pixels = [tuple(int(v) for v in c.split(",")) for c in colours]
    # Anti-aliased edges of overlapping dots shift a channel by a few units.
    assert pixels and all(min(max(abs(a - b) for a, b in zip(p, band)) for band in bands) <= 6 for p in pixels)
