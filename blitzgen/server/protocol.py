"""The OpenAI request bodies the server accepts, their validation, and its error bodies.

Bodies are parsed strictly: a wrong type is a 400, never coerced ("1" is not 1, true is not 1), a
value out of OpenAI's documented range is a 400 naming the field, and a field we do not implement
with a value that would change the result (penalties, logit_bias, tools, ...) is a 400 rather than
silently ignored. Unknown fields are ignored, as OpenAI's own server does.

Every error is one line in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from blitzgen.sampling import SamplingParams

MAX_N = 128  # `n`
MAX_CHOICES = 256  # prompts x n in one completion request
# Stop strings per request, and characters per stop string: every token of every sequence is checked
# against each (held-back text included), on the engine thread that serves all requests.
MAX_STOP, MAX_STOP_CHARS = 8, 256


class ApiError(Exception):
    """An HTTP error with OpenAI's JSON body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def validation_error(exc: ValidationError) -> ApiError:
    """The first problem pydantic found, as one 400 line naming the field."""
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({error['msg'].removeprefix('Invalid JSON: ')})",
                        code="invalid_json")
    if not error["loc"]:
        return ApiError(400, "the request body must be a JSON object", code="invalid_type")
    param = ".".join(str(part) for part in error["loc"])
    message = error["msg"][0].lower() + error["msg"][1:]
    if error["type"] == "missing":
        return ApiError(400, f"'{param}' is required", param=param, code="missing_required_parameter")
    return ApiError(400, f"invalid '{param}': {message} (got {error.get('input')!r:.80})", param=param,
                    code="invalid_value")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=2**31)  # -1 or 0: off (vLLM writes -1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**62)
    stop: Any = None  # a string or a list of strings; checked in stop_strings()
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    # Accepted only at the values that change nothing.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict | None = None
    user: str | None = None

    def check_unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise ApiError(400, f"'{name}' is not supported (only 0)", param=name, code="unsupported_parameter")
        if self.repetition_penalty not in (None, 1):
            raise ApiError(400, "'repetition_penalty' is not supported (only 1)", param="repetition_penalty",
                           code="unsupported_parameter")
        if self.logit_bias:
            raise ApiError(400, "'logit_bias' is not supported", param="logit_bias", code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "'stream_options' is only allowed with stream: true", param="stream_options",
                           code="invalid_value")

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is None:
            return []
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "invalid 'stop': expected a non-empty string or a list of non-empty strings",
                           param="stop", code="invalid_value")
        if len(stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stop):
            raise ApiError(400, f"invalid 'stop': at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters",
                           param="stop", code="invalid_value")
        return stop

    def sampling_params(self, max_new_tokens: int) -> list[SamplingParams]:
        """The `n` choices' sampling parameters. With a seed, choice j draws from a seed derived from
        it (choice 0 from the seed itself, so n=1 gives what the same seed gives alone)."""
        seeds = [None] * self.n
        if self.seed is not None:
            seeds = [self.seed if j == 0 else (self.seed + j * 0x9E3779B97F4A7C15) % 2**62 for j in range(self.n)]
        return [SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=max(self.top_k or 0, 0),
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=self.min_p or 0.0,
            seed=seed,
            max_new_tokens=max_new_tokens,
            stop=self.stop_strings(),
            ignore_eos=self.ignore_eos,
        ) for seed in seeds]


class CompletionRequest(_Body):
    prompt: Any  # a string, a list of strings, a list of token ids or a list of lists of token ids
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_unsupported(self):
        super().check_unsupported()
        if self.suffix:
            raise ApiError(400, "'suffix' is not supported", param="suffix", code="unsupported_parameter")
        if self.best_of not in (None, self.n):
            raise ApiError(400, "'best_of' is not supported (only equal to n)", param="best_of",
                           code="unsupported_parameter")
        if self.echo and self.logprobs is not None:
            raise ApiError(400, "'echo' with 'logprobs' is not supported (no prompt logprobs)", param="echo",
                           code="unsupported_parameter")

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: strings or lists of token ids."""
        prompt = self.prompt

        def is_ids(x):
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return list(prompt)
            if is_ids(prompt):
                return [prompt]
            if all(is_ids(p) for p in prompt):
                return list(prompt)
        raise ApiError(400, "invalid 'prompt': expected a string, a list of strings, a list of token ids or a list "
                       "of lists of token ids, not empty", param="prompt", code="invalid_value")


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # a string, a list of {"type": "text", "text": ...} parts, or null
    name: str | None = None

    def text(self, index: int) -> str:
        content = self.content
        if content is None or isinstance(content, str):
            return content or ""
        if isinstance(content, list) and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise ApiError(400, f"invalid 'messages.{index}.content': expected a string or a list of text parts "
                       "(only text is supported)", param=f"messages.{index}.content", code="invalid_value")


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    response_format: dict | None = None

    def check_unsupported(self):
        super().check_unsupported()
        if self.tools:
            raise ApiError(400, "'tools' is not supported", param="tools", code="unsupported_parameter")
        if self.response_format not in (None, {"type": "text"}):
            raise ApiError(400, "'response_format' is not supported (only {\"type\": \"text\"})",
                           param="response_format", code="unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")

    def conversation(self) -> list[dict]:
        """The messages as the chat template reads them."""
        out = []
        for i, m in enumerate(self.messages):
            message = {"role": m.role, "content": m.text(i)}
            if m.name is not None:
                message["name"] = m.name
            out.append(message)
        return out
