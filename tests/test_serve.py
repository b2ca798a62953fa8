"""`python -m theworld.serve`: the OpenAI-compatible API, the demo in a real headless browser, and the
safety worker in front of every request and answer.

One server process per module (tiny models, its own spawned tiny worker) serves most tests; a few run
the app in-process against the session's shared workers (answer filter, sanitised frames, API key, a
worker that is gone). The test that kills the server's worker runs last.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from safety_worker.tiny import BLOCKED_PHRASE, SAFE_EXAMPLE
from theworld.serving import ERROR_CODES

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# tests/test_demo_trained.py also saves its screenshot of the trained model here (docs/images/serve-demo.png).
SCREENSHOT_ENV = "THEWORLD_SERVE_SCREENSHOT"
SERVER_FLAGS = ["--served-model-name", "theworld-tiny", "--rollout-steps", "2", "--batch-wait-ms", "100", "--max-prompt-tokens", "64",
                "--max-image-bytes", "60000", "--max-image-pixels", "40000", "--request-timeout", "120"]


def png_uri(image: np.ndarray, fmt: str = "PNG") -> str:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format=fmt)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif"}[fmt]
    return f"data:{mime};base64,{base64.b64encode(out.getvalue()).decode()}"


def scene(seed: int = 0, size=(32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def chat(text: str = "What is here?", images=None, **fields) -> dict:
    images = [scene()] if images is None else images
    content = [{"type": "image_url", "image_url": {"url": png_uri(i)}} for i in images] + [{"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 8, **fields}


def metric(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    found = re.search(r"^" + pattern + "$", text, re.M)
    return float(found.group(1)) if found else 0.0


# ----------------------------------------------------------------------------------------- the server


@contextlib.contextmanager
def serving(*flags: str):
    """`python -m theworld.serve --port 0 FLAGS` until the block ends (SIGTERM, which must stop it cleanly);
    yields its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "theworld.serve", "--port", "0", *flags],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("theworld-serve ready "):
                break
        else:
            pytest.fail("the server exited before it was ready:\n" + "".join(lines[-40:]))
        url = line.split()[2]
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep the pipe drained
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(30) == 0, "the server did not stop cleanly on SIGTERM"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tiny_models):
    """`python -m theworld.serve` on a free port, with a worker it spawned itself; yields its base URL."""
    gemma_dir, cosmos_dir = tiny_models
    with serving("--model", str(gemma_dir), "--cosmos", str(cosmos_dir), *SERVER_FLAGS) as url:
        yield url


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server, timeout=120) as client:
        yield client


def test_answers_an_image_in_the_openai_shape(api):
    response = api.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 8 and usage["prompt_tokens"] > 16  # the prompt holds the world tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    again = api.post("/v1/chat/completions", json=chat()).json()
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]  # temperature 0 is greedy


def test_seeded_sampling_is_reproducible(api):
    request = chat(temperature=1.0, seed=1234, max_tokens=12)
    first, second = (api.post("/v1/chat/completions", json=request).json() for _ in range(2))
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


def test_a_clip_is_several_image_parts_oldest_first(api):
    clip = [scene(seed) for seed in range(5)]
    response = api.post("/v1/chat/completions", json=chat("Which way does it move?", clip))
    assert response.status_code == 200, response.text
    refused = api.post("/v1/chat/completions", json=chat("Which way?", clip[:3])).json()
    assert refused["error"]["code"] == "invalid_clip" and "1 + 4k" in refused["error"]["message"]


def test_blocked_prompt_is_refused_with_400_and_nothing_generated(api):
    before = api.get("/metrics").text
    response = api.post("/v1/chat/completions", json=chat(f"Where is it? {BLOCKED_PHRASE}", rollout=1))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "content_blocked" and error["stage"] == "prompt" and "blocked" in error["message"]
    after = api.get("/metrics").text
    assert metric(after, "theworld_serve_refusals_total", stage="prompt") == \
        metric(before, "theworld_serve_refusals_total", stage="prompt") + 1
    assert metric(after, "theworld_serve_batch_size_count") == metric(before, "theworld_serve_batch_size_count")


def _too_big_image():
    return scene(1, (150, 150))  # ~67 kB of noise as PNG: over --max-image-bytes 60000, under the pixel cap


BAD_REQUESTS = {
    "malformed_json": (b'{"messages": [', 400, "invalid_json"),
    "json_not_an_object": (b'["messages"]', 400, "invalid_json"),
    "missing_messages": ({"max_tokens": 4}, 400, "missing_field"),
    "wrong_type_max_tokens": (chat(max_tokens="ten"), 400, "invalid_type"),
    "wrong_type_messages": ({"messages": "hello"}, 400, "invalid_type"),
    "temperature_out_of_range": (chat(temperature=3), 400, "invalid_value"),
    "n_above_one": (chat(n=2), 400, "unsupported"),
    "last_turn_not_user": ({"messages": [*chat()["messages"], {"role": "assistant", "content": "hi"}]}, 400,
                           "invalid_message"),
    "rollout_of_text_only": ({"messages": [{"role": "user", "content": "hello"}], "rollout": 1}, 400,
                             "rollout_unavailable"),
    "remote_url": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, 400, "invalid_image_url"),
    "not_an_image": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGVsbG8="}}]}]}, 400, "invalid_image"),
    "png_that_is_not": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}}]}]}, 400, "invalid_image"),
    "too_many_frames": (chat(images=[scene(i) for i in range(10)]), 400, "too_many_frames"),
    "frames_of_two_sizes": (chat(images=[scene(0), scene(1, (16, 16)), scene(2), scene(3), scene(4)]), 400,
                            "invalid_clip"),
    "prompt_over_token_limit": (chat("tell me " * 200), 400, "prompt_too_long"),
    "max_tokens_over_limit": (chat(max_tokens=100_000), 400, "max_tokens_too_large"),
    "rollout_over_limit": (chat(rollout=9), 400, "rollout_unavailable"),
    "image_over_size_cap": (chat(images=[_too_big_image()]), 413, "image_too_large"),
    "image_over_pixel_cap": (chat(images=[np.zeros((250, 250, 3), np.uint8)]), 413, "image_too_large"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_input_gets_a_specific_4xx_and_the_server_keeps_serving(api, name):
    body, status, code = BAD_REQUESTS[name]
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    response = api.post("/v1/chat/completions", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and ERROR_CODES[code][0] == status and error["message"]
    assert error["type"] == "invalid_request_error"  # OpenAI's type of every 400 and 413
    assert api.get("/health").status_code == 200


def test_unknown_routes_and_methods_answer_in_the_error_format(api):
    missing = api.get("/v1/embeddings").json()["error"]
    assert missing["code"] == "not_found" and missing["type"] == "not_found_error"
    response = api.get("/v1/chat/completions")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_every_error_code_is_documented():
    doc = (REPO_ROOT / "docs" / "serve.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (\d{3}) \|", doc, re.M))
    assert rows == {code: str(status) for code, (status, _) in ERROR_CODES.items()}


def test_rollout_comes_back_as_a_checked_mp4(api):
    import imageio.v3 as iio

    response = api.post("/v1/chat/completions", json=chat("What happens next?", rollout=1, max_tokens=4))
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message["rollout_blocked"] is None
    prefix = "data:video/mp4;base64,"
    assert message["rollout_video"].startswith(prefix)
    frames = iio.imread(base64.b64decode(message["rollout_video"][len(prefix):]), extension=".mp4", plugin="FFMPEG")
    assert frames.shape[0] == 1 + 4 * 1 and frames.shape[-1] == 3  # the observed frame and 4 predicted


def test_stream_true_sends_the_checked_answer_as_server_sent_events(api):
    plain = api.post("/v1/chat/completions", json=chat()).json()["choices"][0]["message"]["content"]
    with api.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.fixture(scope="module")
def openai_client(server):
    """The real `openai` client, as a new user would point it at the server (no retries: every answer counts)."""
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_asks_text_alone(openai_client, api, tiny_world_model):
    """Gemma 3 answers text alone: no image part, no world tokens (the prompt is the chat template only)."""
    answer = openai_client.chat.completions.create(
        model="theworld-tiny", messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    with_image = api.post("/v1/chat/completions", json=chat("Say hello.", max_tokens=6)).json()
    world_tokens = tiny_world_model.processor.num_world_tokens(1)
    assert answer.usage.prompt_tokens + world_tokens < with_image["usage"]["prompt_tokens"]
    blocked = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": BLOCKED_PHRASE}]})
    assert blocked.status_code == 400 and blocked.json()["error"]["stage"] == "prompt"  # checked like any prompt


def test_openai_client_asks_about_a_clip_and_streams(openai_client, api):
    clip = [scene(seed) for seed in range(5)]
    content = [{"type": "image_url", "image_url": {"url": png_uri(frame)}} for frame in clip]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": "Which way does it move?"}]}]
    answer = openai_client.chat.completions.create(model="theworld-tiny", messages=messages, max_tokens=8,
                                                   temperature=0)
    expected = api.post("/v1/chat/completions", json=chat("Which way does it move?", clip)).json()
    assert answer.choices[0].message.content == expected["choices"][0]["message"]["content"]
    stream = openai_client.chat.completions.create(model="theworld-tiny", messages=messages, max_tokens=8,
                                                   temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == answer.choices[0].message.content


def test_openai_client_reads_our_errors(openai_client):
    import openai

    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.chat.completions.create(model="theworld-tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert refused.value.code == "invalid_image_url" and refused.value.type == "invalid_request_error"


def test_health_ready_models_and_metrics(api):
    assert api.post("/v1/chat/completions", json=chat()).status_code == 200
    assert api.get("/health").json() == {"status": "ok"}
    ready = api.get("/ready").json()
    assert ready["status"] == "ready" and ready["safety_worker"]["pid"] > 0
    assert [m["id"] for m in api.get("/v1/models").json()["data"]] == [ready["model"]]
    text = api.get("/metrics").text
    for name in ("theworld_serve_requests_total", "theworld_serve_request_seconds_bucket",
                 "theworld_serve_refusals_total", "theworld_serve_batch_size_bucket"):
        assert name in text
    assert metric(text, "theworld_serve_requests_total", route="/v1/chat/completions", status="200") > 0


def test_concurrent_requests_are_batched_and_health_stays_responsive(api, server):
    before = api.get("/metrics").text
    results, health = [], []

    def ask(seed):
        with httpx.Client(base_url=server, timeout=120) as client:
            results.append(client.post("/v1/chat/completions", json=chat(images=[scene(seed)], max_tokens=16)).status_code)

    threads = [threading.Thread(target=ask, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        started = time.monotonic()
        assert api.get("/health").status_code == 200
        health.append(time.monotonic() - started)
    for t in threads:
        t.join()
    assert results == [200] * 8
    assert max(health) < 2.0, f"/health took {max(health):.2f}s while requests were generating"
    after = api.get("/metrics").text
    batches = metric(after, "theworld_serve_batch_size_count") - metric(before, "theworld_serve_batch_size_count")
    rows = metric(after, "theworld_serve_batch_size_sum") - metric(before, "theworld_serve_batch_size_sum")
    assert rows == 8 and batches < 8, f"8 concurrent requests ran as {batches:g} batches"


# ----------------------------------------------------------------------------------------- the demo


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (.ci/run installs them with apt)")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _ask_in_page(driver, image_path: Path, question: str) -> tuple[str, str]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.CSS_SELECTOR, "#image-input input[type=file]").send_keys(str(image_path))
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-input img"))
    box = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
    box.clear()
    box.send_keys(question)
    return click_ask_and_read(driver)


def click_ask_and_read(driver) -> tuple[str, str]:
    """Click Ask; `(answer, status)` once the page shows this question's final status."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    old_status = driver.find_element(By.CSS_SELECTOR, "#status").text
    driver.find_element(By.CSS_SELECTOR, "#ask").click()
    # Wait for this event's final status (while it runs, Gradio shows its progress text in the same element).
    # While the event runs, Gradio overlays its progress ("processing | 0.4s") on the old status.
    final = ("passed the safety checker", "Refused by the safety checker", "Not answered")
    WebDriverWait(driver, 60).until(lambda d: (lambda text: text != old_status and any(f in text for f in final)
                                               and "processing" not in text)(
        d.find_element(By.CSS_SELECTOR, "#status").text))
    status = driver.find_element(By.CSS_SELECTOR, "#status").text
    # The answer box may render a moment after the status: wait until it shows this event's answer.
    answered = "passed the safety checker" in status
    read = "return document.querySelector('#answer textarea').value"
    WebDriverWait(driver, 10).until(lambda d: bool(d.execute_script(read)) == answered)
    return driver.execute_script(read), status


def test_demo_page_answers_an_uploaded_image_offline(browser, server, api, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = np.kron(scene(5, (16, 16)), np.ones((8, 8, 1), np.uint8))  # 128x128 blocks: visible in the screenshot
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    browser.get(server + "/")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-input input[type=file]"))

    answer, status = _ask_in_page(browser, path, "What is here?")
    api_answer = api.post("/v1/chat/completions", json=chat(images=[image], max_tokens=32)).json()
    assert answer == api_answer["choices"][0]["message"]["content"]  # the same greedy answer as the API's
    assert "passed the safety checker" in status
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#seen img"))
    origin = server.rstrip("/")
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(origin) for url in loaded), [u for u in loaded if not u.startswith(origin)]

    browser.get(server + "/")  # a fresh page: the refusal is all it shows
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-input input[type=file]"))
    answer, status = _ask_in_page(browser, path, f"Please {BLOCKED_PHRASE}")
    assert answer == "" and status.startswith("Refused by the safety checker (prompt)")


# ----------------------------------------------------------------------------------------- in-process


class ForcePhrase:
    """A logits processor that makes the real model write `ids` (then end): to test the answer filter."""

    def __init__(self, ids: list[int], end: int):
        self.ids, self.end, self.start = ids, end, None

    def __call__(self, input_ids, scores):
        import torch

        self.start = input_ids.shape[1] if self.start is None else self.start
        step = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.ids[step] if step < len(self.ids) else self.end] = 0
        return forced


@pytest.fixture()
def in_process(tiny_world_model):
    """`make(endpoint, **options)` -> a `ServeApp` on the session's tiny model (no demo); closed after the test.
    The model is shared with other test modules: no rollouts here (they would attach its Cosmos transformer)."""
    from theworld.inference.engine import BatchingEngine
    from theworld.inference.guard import Guard
    from theworld.inference.pipeline import GuardedPipeline
    from theworld.serving.app import ServeApp
    from theworld.serving.metrics import ServeMetrics
    from theworld.serving.schema import Limits

    made = []

    def make(endpoint: str, *, api_key=None, request_timeout=60.0, **generation_kwargs):
        metrics = ServeMetrics()
        engine = BatchingEngine(tiny_world_model, on_batch=metrics.batch_size.observe, **generation_kwargs)
        guard = Guard(endpoint)
        made.append((engine, guard))
        pipeline = GuardedPipeline(engine, guard, request_timeout=request_timeout)
        return ServeApp(pipeline, metrics, model_name="tiny", limits=Limits(), api_key=api_key, demo=False)

    yield make
    for engine, guard in made:
        engine.close()
        guard.close()


def test_blocked_answer_comes_back_empty_with_finish_reason_content_filter(in_process, tiny_safety_worker,
                                                                           tiny_world_model):
    from fastapi.testclient import TestClient
    from transformers import LogitsProcessorList

    tokenizer = tiny_world_model.processor.tokenizer
    phrase = tokenizer(BLOCKED_PHRASE, add_special_tokens=False)["input_ids"]
    force = ForcePhrase(phrase, tokenizer.convert_tokens_to_ids("<end_of_turn>"))
    app = in_process(tiny_safety_worker.endpoint, logits_processor=LogitsProcessorList([force]))
    with TestClient(app.app) as client:
        response = client.post("/v1/chat/completions", json=chat(SAFE_EXAMPLE, max_tokens=len(phrase) + 1))
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] == ""
    assert force.start is not None  # the model did write the phrase
    assert metric(app.metrics.exposition().decode(), "theworld_serve_refusals_total", stage="answer") == 1


def test_the_model_sees_only_the_workers_sanitised_frames(in_process, tiny_safety_worker_faces, tiny_world_model):
    from safety_worker import SafetyClient
    from theworld.data.collator import TheWorldCollator
    from theworld.inference.engine import generate_batch
    from theworld.serving.schema import ChatRequest

    frames = np.stack([scene(3, (40, 40))])
    app = in_process(tiny_safety_worker_faces.endpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is here?"}]}]
    request = app.validate(ChatRequest(messages=messages, frames=frames, max_tokens=8))
    completion = asyncio.run(app.complete(request))
    with SafetyClient(tiny_safety_worker_faces.endpoint) as client:
        pixelated = client.check_video(frames).frames
    assert not np.array_equal(pixelated, frames)  # this worker pixelates every frame
    np.testing.assert_array_equal(completion.frames_seen, pixelated)
    expected = generate_batch(tiny_world_model, TheWorldCollator(tiny_world_model, for_generation=True),
                              [{"id": "x", "messages": messages, "images": list(pixelated)}], max_new_tokens=8,
                              do_sample=False)
    assert completion.content == expected.answer(tiny_world_model, 0)


def test_api_key_is_required_on_the_api_but_not_on_probes(in_process, tiny_safety_worker):
    from fastapi.testclient import TestClient

    app = in_process(tiny_safety_worker.endpoint, api_key="s3cret")
    with TestClient(app.app) as client:
        refused = client.post("/v1/chat/completions", json=chat())
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        assert client.get("/metrics").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/health").status_code == 200
        answered = client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer s3cret"})
        assert answered.status_code == 200, answered.text


def test_binding_beyond_loopback_without_an_api_key_is_refused():
    done = subprocess.run([sys.executable, "-m", "theworld.serve", "--host", "0.0.0.0"], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 2 and "--api-key" in done.stderr


def test_a_worker_that_is_gone_fails_requests_with_503_in_time(in_process, tmp_path):
    from fastapi.testclient import TestClient

    app = in_process(f"ipc://{tmp_path}/nobody.sock", request_timeout=2.0)
    with TestClient(app.app) as client:
        started = time.monotonic()
        response = client.post("/v1/chat/completions", json=chat())
        assert response.status_code == 503 and response.json()["error"]["code"] == "safety_unavailable"
        assert response.json()["error"]["type"] == "server_error"
        assert time.monotonic() - started < 10
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        assert client.get("/health").status_code == 200


# ----------------------------------------------------------------------------------------- last: kills the worker


def test_worker_killed_mid_request_the_request_is_answered_by_the_restarted_worker(api):
    old_pid = api.get("/ready").json()["safety_worker"]["pid"]
    result = {}

    def ask():
        result["response"] = api.post("/v1/chat/completions", json=chat(SAFE_EXAMPLE, rollout=1, max_tokens=4))

    thread = threading.Thread(target=ask)
    thread.start()
    time.sleep(0.05)
    os.kill(old_pid, signal.SIGKILL)
    thread.join(180)
    response = result["response"]
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message["rollout_video"].startswith("data:video/mp4;base64,")  # checked by the restarted worker
    assert api.get("/ready").json()["safety_worker"]["pid"] != old_pid
    blocked = api.post("/v1/chat/completions", json=chat(BLOCKED_PHRASE))
    assert blocked.status_code == 400 and blocked.json()["error"]["code"] == "content_blocked"
