"""`blitzgen serve`: the OpenAI-compatible server, driven over HTTP on 127.0.0.1 by the official
openai client and by httpx, on the default model (and a tiny ChatML model for chat).

The server is a front end: what it returns is checked against the Generator called directly,
against itself alone (32 concurrent requests give exactly what each gives alone), and its
logprobs against transformers' own forward pass.
"""

import concurrent.futures
import json
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch
import transformers
import uvicorn

import blitzgen
from blitzgen.cli import main as cli_main
from blitzgen.generate import DEFAULT_MODEL
from blitzgen.server import create_app

MODEL = "shakespeare"
PROMPTS = [  # distinct first tokens, so no request reuses another's cached prefix
    "ROMEO:", "JULIET:", "KING HENRY:", "First Citizen:", "Good morrow, cousin.", "O, what a rogue",
    "To be, or not to be", "Now is the winter", "Friends, Romans, countrymen,", "If music be the food",
    "All the world's a stage", "Is this a dagger", "What light through yonder", "Shall I compare thee",
    "Once more unto the breach", "Double, double toil", "We few, we happy few", "Let me not to the marriage",
    "Out, damned spot!", "Cry havoc,", "Alas, poor Yorick!", "Beware the ides", "Lord, what fools",
    "My kingdom for a horse!", "Uneasy lies the head", "Something is rotten", "Brevity is the soul",
    "Parting is such sweet sorrow", "Exit, pursued by a bear.", "Hark!", "Thou art", "Give me",
]


@dataclass
class Served:
    app: object
    url: str

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0,
                             **kwargs)

    @property
    def engine(self):
        return self.app.state.engine


@contextmanager
def serving(generator, **kwargs):
    """create_app + uvicorn on 127.0.0.1 (a free port) in a background thread, until the block ends."""
    app = create_app(generator, model_name=MODEL, **kwargs)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Served(app, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture(scope="module")
def served():
    with serving(blitzgen.load(device="cpu"), max_batch_size=8) as s:
        yield s


@pytest.fixture(scope="module")
def reference():
    """A second engine on the same model, called directly."""
    return blitzgen.load(device="cpu")


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, timeout=120) as client:
        yield client


def greedy(max_new_tokens, **kwargs):
    return blitzgen.SamplingParams(temperature=0, max_new_tokens=max_new_tokens, **kwargs)


def sse_events(response) -> list:
    """The data of each server-sent event; the last one must be [DONE]."""
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def wait_for(condition, what: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


# ---- endpoints, through the openai client -------------------------------------------------------


def test_models_health_and_metrics(served, http):
    client = served.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert http.get("/health").json() == {"status": "ok"}
    client.completions.create(model=MODEL, prompt="Hark!", max_tokens=3, temperature=0)
    text = http.get("/metrics").text
    for name in ("blitzgen_requests_total", "blitzgen_generation_tokens_total", "blitzgen_prompt_tokens_total",
                 "blitzgen_queue_depth", "blitzgen_batch_size", "blitzgen_time_to_first_token_seconds_bucket",
                 "blitzgen_inter_token_latency_seconds_bucket"):
        assert name in text
    assert 'blitzgen_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_completion_is_what_the_engine_generates(served, reference):
    client = served.client()
    out = client.completions.create(model=MODEL, prompt="To be, or not to be", max_tokens=20, temperature=0)
    expected = reference.generate(["To be, or not to be"], greedy(20))[0]
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason == "length"
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == 20 and out.usage.total_tokens == out.usage.prompt_tokens + 20
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")

    # Token ids as the prompt, and a batch of prompts: one choice per prompt, in order.
    ids = [reference.tokenizer.encode(p) for p in ("Now is the winter", "Hark!")]
    texts = [c.text for c in reference.generate(ids, greedy(8))]
    for prompt in (ids, ["Now is the winter", "Hark!"]):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        assert [c.index for c in out.choices] == [0, 1] and [c.text for c in out.choices] == texts
        assert out.usage.prompt_tokens == len(ids[0]) + len(ids[1])


def test_streamed_completion_equals_the_whole(served, http):
    client = served.client()
    kwargs = dict(model=MODEL, prompt="Friends, Romans, countrymen,", max_tokens=24, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])

    # On the wire: OpenAI's chunk format, ending with data: [DONE]; no usage chunk unless asked for.
    with http.stream("POST", "/v1/completions", json={**kwargs, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert all(e["object"] == "text_completion" and e["choices"] for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == whole.choices[0].text

    echo = client.completions.create(**kwargs, echo=True)
    assert echo.choices[0].text == kwargs["prompt"] + whole.choices[0].text


def test_stop_strings_and_sampling_parameters(served, reference):
    client = served.client()
    full = reference.generate(["Now is the winter"], greedy(40))[0].text
    stop = full[10:14]
    out = client.completions.create(model=MODEL, prompt="Now is the winter", max_tokens=40, temperature=0,
                                    stop=[stop, "never appears"])
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text == full[: full.index(stop)]
    streamed = client.completions.create(model=MODEL, prompt="Now is the winter", max_tokens=40, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]

    params = dict(temperature=0.9, top_p=0.9, seed=1234, max_tokens=16)
    out = client.completions.create(model=MODEL, prompt="Hark!", **params, extra_body={"top_k": 40, "min_p": 0.05})
    expected = reference.generate(["Hark!"], blitzgen.SamplingParams(
        temperature=0.9, top_p=0.9, top_k=40, min_p=0.05, seed=1234, max_new_tokens=16))[0]
    assert out.choices[0].text == expected.text


def test_n_choices_with_a_seed(served):
    client = served.client()
    kwargs = dict(model=MODEL, prompt="Thou art", max_tokens=12, temperature=1.0, seed=7)
    out = client.completions.create(**kwargs, n=3)
    texts = [c.text for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert out.usage.completion_tokens == 36 and out.usage.prompt_tokens == 2
    assert [c.text for c in client.completions.create(**kwargs, n=3).choices] == texts  # same seed, same texts
    assert client.completions.create(**kwargs).choices[0].text == texts[0]  # choice 0 draws from the seed itself
    streamed = client.completions.create(**kwargs, n=3, stream=True)
    by_index = ["", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            by_index[c.index] += c.text
    assert by_index == texts


def test_logprobs_match_transformers(served, reference):
    """Log-probabilities of the model's own distribution (before temperature), as transformers computes
    them on the same weights: the chosen token's and the top 5, at every generated position."""
    client = served.client()
    prompt, steps = "Is this a dagger", 10
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=steps, temperature=0, logprobs=5)
    generated = reference.generate([prompt], greedy(steps))[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    ids = generated.prompt_token_ids + generated.token_ids
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, len(generated.prompt_token_ids) - 1 : -1]  # (steps, V)
    expected = logits.log_softmax(-1)
    lp = out.choices[0].logprobs
    decode = reference.tokenizer.decode
    assert lp.tokens == [decode([t]) for t in generated.token_ids]
    # fp32 on both sides, summed in different orders over 6 layers: agreement to ~1e-5 in log-probability.
    assert lp.token_logprobs == pytest.approx(expected[range(steps), generated.token_ids].tolist(), abs=1e-4)
    for position, top in enumerate(lp.top_logprobs):
        values, indices = expected[position].topk(5)
        assert sorted(top.values(), reverse=True) == pytest.approx(values.tolist(), abs=1e-4)
        assert set(top) == {decode([i]) for i in indices.tolist()}
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])

    # Streamed, every token carries its logprobs; logprobs=0 gives the chosen token's alone.
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=steps, temperature=0,
                                            logprobs=0, stream=True))
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    # Not bit-equal: this time the slot's cache holds the prompt, and only its last token is prefilled.
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert all(len(c.choices[0].logprobs.top_logprobs[0]) == 1 for c in chunks)


# ---- continuous batching -----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_prefill", [False, True])
def test_32_concurrent_greedy_requests_equal_each_alone(served, batch_prefill, monkeypatch):
    """Batching changes nothing but speed: 32 requests with different prompts and lengths, more than
    the 8 slots, sent at once (half of them streaming), each return exactly what they return alone;
    with the new sequences of a step boundary prefilled one by one (the CPU default) or together
    (the GPU default)."""
    monkeypatch.setattr(served.engine, "batch_prefill", batch_prefill)
    client = served.client(timeout=300)
    requests = [dict(prompt=p, max_tokens=4 + (7 * i) % 37, stream=i % 2 == 1) for i, p in enumerate(PROMPTS)]

    def send(request):
        kwargs = dict(model=MODEL, prompt=request["prompt"], max_tokens=request["max_tokens"], temperature=0)
        if not request["stream"]:
            c = client.completions.create(**kwargs).choices[0]
            return c.text, c.finish_reason
        chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True)]
        return "".join(c.text for c in chunks), chunks[-1].finish_reason

    alone = [send(r) for r in requests]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(send, requests))
    assert together == alone
    assert len({text for text, _ in alone}) == len(alone)


class StepGate:
    """Holds the engine's decode steps until the test lets them through (prefill is never held), so
    nothing finishes before the test has looked."""

    def __init__(self, step):
        self.step, self.permits, self.cond = step, math.inf, threading.Condition()

    def __call__(self, rows=None):
        with self.cond:
            self.cond.wait_for(lambda: self.permits > 0)
            self.permits -= 1
        return self.step(rows)

    def allow(self, steps: float):
        with self.cond:
            self.permits = steps
            self.cond.notify_all()


def test_cancelled_stream_frees_its_slot_and_a_full_batch_refuses_with_429():
    generator = blitzgen.load(device="cpu")
    generator.step = gate = StepGate(generator.step)
    with serving(generator, max_batch_size=2, max_queue=0) as s, httpx.Client(base_url=s.url, timeout=120) as http:
        scheduler = s.engine.scheduler
        long = dict(model=MODEL, max_tokens=450, temperature=0, ignore_eos=True, stream=True)

        def stream(prompt):
            """The response and its one line iterator (dropping an httpx iterator hangs up)."""
            response = http.send(http.build_request("POST", "/v1/completions", json={**long, "prompt": prompt}),
                                 stream=True)
            assert response.status_code == 200
            return response, response.iter_lines()

        gate.allow(0)
        first, first_lines = stream("Hark!")
        next(first_lines)  # its first token (prefill); the engine now waits in the next step
        second, second_lines = stream("Thou art")
        gate.allow(1)  # that step ends, the next plan admits the second stream
        next(second_lines)
        assert scheduler.num_running == 2
        # Both slots busy, no queue: refused with 429 and Retry-After.
        busy = http.post("/v1/completions", json={"model": MODEL, "prompt": "Give me", "max_tokens": 2})
        assert busy.status_code == 429 and int(busy.headers["retry-after"]) > 0
        assert busy.json()["error"]["type"] == "rate_limit_error"
        # The second client hangs up mid-stream: its request is cancelled and its slot freed at once,
        # while the engine is still held inside a step.
        second.close()
        wait_for(lambda: scheduler.num_running == 1, "the cancelled stream's slot to be freed")
        pending = concurrent.futures.ThreadPoolExecutor(1).submit(
            http.post, "/v1/completions", json={"model": MODEL, "prompt": "Give me", "max_tokens": 2})
        gate.allow(math.inf)
        done = pending.result()
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 2
        chunks = [line for line in first_lines if line.startswith("data: ")]
        assert len(chunks) == 450 and chunks[-1] == "data: [DONE]"  # 450 tokens, the first read above
        first.close()

        # A non-streaming client that gives up is cancelled too.
        gate.allow(0)
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={**long, "stream": False, "prompt": "Hark!"}, timeout=0.5)
        wait_for(lambda: not scheduler.has_work(), "the abandoned request to go")
        gate.allow(math.inf)
        metrics = http.get("/metrics").text
        assert "blitzgen_cancelled_sequences_total 2.0" in metrics
        assert 'blitzgen_requests_total{endpoint="/v1/completions",status="499"} 1.0' in metrics


# ---- chat ------------------------------------------------------------------------------------------------


def test_chat_without_a_template_is_400(served):
    with pytest.raises(openai.BadRequestError) as info:
        served.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert "no chat template" in info.value.body["message"]
    assert info.value.body["code"] == "no_chat_template"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from test_chat import CHATML, _save_model  # the tiny ChatML model the chat tests build

    path = tmp_path_factory.mktemp("chatml")
    _save_model(path, CHATML)
    return path


def test_chat_completions_use_the_checkpoint_template(chat_model):
    reference = blitzgen.load(chat_model, device="cpu")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is York?"}]
    prompt = reference.tokenizer.encode(reference.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    expected = reference.generate([prompt], greedy(12))[0]
    with serving(blitzgen.load(chat_model, device="cpu"), max_batch_size=2) as s:
        client = s.client()
        out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12, temperature=0)
        assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
        assert out.choices[0].message.role == "assistant"
        assert out.choices[0].message.content == expected.text
        assert out.choices[0].finish_reason == expected.finish_reason
        assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == len(expected.token_ids)

        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
        assert chunks[-1].usage.completion_tokens == len(expected.token_ids)

        # Text parts are joined; logprobs come in the chat format.
        parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "Who is "},
                                                              {"type": "text", "text": "York?"}]}]
        out = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=12, temperature=0,
                                             logprobs=True, top_logprobs=3)
        assert out.choices[0].message.content == expected.text
        content = out.choices[0].logprobs.content
        assert len(content) == len(expected.token_ids) and all(len(c.top_logprobs) == 3 for c in content)
        assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy: the best

        with pytest.raises(openai.BadRequestError, match="only text"):
            client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


# ---- bad input -----------------------------------------------------------------------------------------

LONG_PROMPT = list(range(1, 500))
BAD_REQUESTS = [
    # (path, body, status, code, words in the message)
    ("/v1/completions", b'{"prompt": "Hark!", "max_tokens": 4', 400, "invalid_json", "not valid JSON"),
    ("/v1/completions", b"", 400, "invalid_json", "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "invalid_type", "JSON object"),
    ("/v1/completions", {"max_tokens": 4}, 400, "missing_required_parameter", "'prompt' is required"),
    ("/v1/completions", {"prompt": 12}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "invalid_value", "empty"),
    ("/v1/completions", {"prompt": [5, 9999]}, 400, "invalid_value", "token ids outside"),
    ("/v1/completions", {"prompt": "Hark!", "temperature": "hot"}, 400, "invalid_value", "temperature"),
    ("/v1/completions", {"prompt": "Hark!", "temperature": 2.5}, 400, "invalid_value", "temperature"),
    ("/v1/completions", {"prompt": "Hark!", "top_p": 0}, 400, "invalid_value", "top_p"),
    ("/v1/completions", {"prompt": "Hark!", "top_k": -2}, 400, "invalid_value", "top_k"),
    ("/v1/completions", {"prompt": "Hark!", "min_p": 1.5}, 400, "invalid_value", "min_p"),
    ("/v1/completions", {"prompt": "Hark!", "seed": -1}, 400, "invalid_value", "seed"),
    ("/v1/completions", {"prompt": "Hark!", "n": 0}, 400, "invalid_value", "'n'"),
    ("/v1/completions", {"prompt": "Hark!", "n": True}, 400, "invalid_value", "'n'"),
    ("/v1/completions", {"prompt": ["Hark!"] * 3, "n": 100}, 400, "invalid_value", "more than 256 choices"),
    ("/v1/completions", {"prompt": "Hark!", "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("/v1/completions", {"prompt": "Hark!", "max_tokens": 1.5}, 400, "invalid_value", "max_tokens"),
    ("/v1/completions", {"prompt": "Hark!", "logprobs": 21}, 400, "invalid_value", "logprobs"),
    ("/v1/completions", {"prompt": "Hark!", "stop": [""]}, 400, "invalid_value", "stop"),
    ("/v1/completions", {"prompt": "Hark!", "stop": 5}, 400, "invalid_value", "stop"),
    ("/v1/completions", {"prompt": "Hark!", "stop": ["x" * 257]}, 400, "invalid_value", "256 characters"),
    ("/v1/completions", {"prompt": "Hark!", "stop": ["a"] * 9}, 400, "invalid_value", "at most 8"),
    ("/v1/completions", b"\xff\xfe{}", 400, "invalid_json", "not valid JSON"),
    ("/v1/completions", b"[" * 100000, 400, "invalid_json", "not valid JSON"),
    ("/v1/completions", {"prompt": "Hark!", "stream": "yes"}, 400, "invalid_value", "stream"),
    ("/v1/completions", {"prompt": "Hark!", "stream_options": {"include_usage": True}}, 400, "invalid_value",
     "stream_options"),
    ("/v1/completions", {"prompt": "Hark!", "presence_penalty": 0.5}, 400, "unsupported_parameter", "presence"),
    ("/v1/completions", {"prompt": "Hark!", "max_tokens": 600}, 400, "context_length_exceeded", "context"),
    ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 20}, 400, "context_length_exceeded", "499 tokens"),
    ("/v1/completions", {"prompt": "Hark!", "model": "gpt-4"}, 404, "model_not_found", "gpt-4"),
    ("/v1/chat/completions", {"messages": []}, 400, "invalid_value", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value", "role"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "invalid_value", "messages"),
    ("/v1/nothing", {}, 404, "not_found", "no route"),
    ("/v1/completions", b"x" * (5 << 20), 413, "request_too_large", "larger than"),
]


@pytest.mark.parametrize("path,body,status,code,words", BAD_REQUESTS,
                         ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_its_status_and_an_openai_error_body(http, path, body, status, code, words):
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert words in error["message"] and "\n" not in error["message"]
    # ... and the server still serves the next good request.
    good = http.post("/v1/completions", json={"prompt": "Hark!", "max_tokens": 2})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2


def test_wrong_method_and_chunked_oversized_body(http):
    response = http.get("/v1/completions")
    assert response.status_code == 405 and response.json()["error"]["type"] == "invalid_request_error"
    # No content-length: the body is counted as it arrives.
    response = http.post("/v1/completions", content=iter([b"{" + b" " * (1 << 20)] * 5))
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_api_key_guards_every_v1_route():
    with serving(blitzgen.load(device="cpu"), max_batch_size=1, api_key="sesame", max_logprobs=0) as s, \
            httpx.Client(base_url=s.url) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            response = http.post("/v1/completions", json={"prompt": "Hark!", "max_tokens": 2}, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
            assert http.get("/v1/models", headers=headers).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        out = s.client(api_key="sesame").completions.create(model=MODEL, prompt="Hark!", max_tokens=2)
        assert out.usage.completion_tokens == 2
        assert http.get("/health").status_code == 200  # probes and Prometheus need no key
        with pytest.raises(openai.BadRequestError, match="turned off"):  # --max-logprobs 0
            s.client(api_key="sesame").completions.create(model=MODEL, prompt="Hark!", max_tokens=2, logprobs=0)


def test_the_engine_survives_a_failing_request(served, http):
    generator = served.engine.generator
    add_sequence, add_sequences, step = generator.add_sequence, generator.add_sequences, generator.step
    poison = 4095  # a prompt starting with this id makes prefill fail: the batch, then the request alone

    def failing_add(slot, prompt, params):
        if prompt[0] == poison:
            raise RuntimeError("injected prefill failure")
        return add_sequence(slot, prompt, params)

    def failing_batch(slots, prompts, params):
        if any(p[0] == poison for p in prompts):
            raise RuntimeError("injected batched prefill failure")
        return add_sequences(slots, prompts, params)

    generator.add_sequence, generator.add_sequences = failing_add, failing_batch
    served.engine.batch_prefill = True  # the batch fails, then the request alone
    try:
        response = http.post("/v1/completions", json={"prompt": [poison, 5], "max_tokens": 3})
        assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
        assert "injected prefill failure" in response.json()["error"]["message"]
        with http.stream("POST", "/v1/completions", json={"prompt": [poison], "max_tokens": 3, "stream": True}) as r:
            events = sse_events(r)
        assert events == [{"error": {"message": events[0]["error"]["message"], "type": "server_error",
                                     "param": None, "code": None}}]
    finally:
        del generator.add_sequence, generator.add_sequences
        served.engine.batch_prefill = False

    def failing_step(rows=None):
        del generator.step  # fail once
        raise RuntimeError("injected step failure")

    generator.step = failing_step
    response = http.post("/v1/completions", json={"prompt": "Hark!", "max_tokens": 5})
    assert response.status_code == 500 and "injected step failure" in response.json()["error"]["message"]
    assert generator.step == step
    good = served.client().completions.create(model=MODEL, prompt="Hark!", max_tokens=5, temperature=0)
    assert good.usage.completion_tokens == 5 and http.get("/health").status_code == 200


def test_a_failing_request_in_a_batched_prefill_fails_alone():
    """Two requests admitted at one step boundary are prefilled together (batch_prefill, the GPU
    default); when that batch fails because of one of them, the engine prefills them one by one and
    only the bad one fails."""
    generator = blitzgen.load(device="cpu")
    generator.step = gate = StepGate(generator.step)
    add_sequence, add_sequences = generator.add_sequence, generator.add_sequences
    poison, batches = 4095, []

    def failing_add(slot, prompt, params):
        if prompt[0] == poison:
            raise RuntimeError("injected prefill failure")
        return add_sequence(slot, prompt, params)

    def failing_batch(slots, prompts, params):
        batches.append(len(prompts))
        if any(p[0] == poison for p in prompts):
            raise RuntimeError("injected batched prefill failure")
        return add_sequences(slots, prompts, params)

    generator.add_sequence, generator.add_sequences = failing_add, failing_batch
    with serving(generator, max_batch_size=4) as s, httpx.Client(base_url=s.url, timeout=120) as http:
        s.engine.batch_prefill = True
        gate.allow(0)
        long = dict(model=MODEL, prompt="Hark!", max_tokens=50, temperature=0, ignore_eos=True, stream=True)
        first = http.send(http.build_request("POST", "/v1/completions", json=long), stream=True)
        lines = first.iter_lines()
        next(lines)  # its first token (prefilled alone); the engine now waits in its first step
        pool = concurrent.futures.ThreadPoolExecutor(2)
        bad = pool.submit(http.post, "/v1/completions", json={"prompt": [poison, 5], "max_tokens": 3})
        good = pool.submit(http.post, "/v1/completions", json={"prompt": "Thou art", "max_tokens": 3,
                                                              "temperature": 0})
        wait_for(lambda: s.engine.scheduler.num_waiting == 2, "both requests to wait for the step boundary")
        gate.allow(math.inf)
        bad, good = bad.result(), good.result()
        assert bad.status_code == 500 and "injected prefill failure" in bad.json()["error"]["message"]
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 3
        # add_sequence goes through add_sequences too: the first stream alone, the failed batch of two,
        # then the good request alone (the bad one fails in failing_add before it gets there).
        assert batches == [1, 2, 1]
        first.close()


def test_serve_command_rejects_bad_options(capsys):
    assert cli_main(["serve", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size 0" in capsys.readouterr().err
    assert cli_main(["serve", "--port", "70000"]) == 2
