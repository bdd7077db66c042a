"""Tokenizer files: text to ids and back, chat templates, and streaming detokenization.

This is the only module that reads a checkpoint's tokenizer files: tokenizer.json (the `tokenizers`
library) or else tokenizer.model (sentencepiece), tokenizer_config.json, chat_template.jinja, and the
`eos_token_id` entries of config.json and generation_config.json. Everything else sees `Tokenizer`.

What "correct" means: encode/decode give the ids and text that Hugging Face transformers 5 gives for
the same directory with tokenizer.json, and what sentencepiece itself gives for a bare tokenizer.model
(transformers 5 needs protobuf to read one, and then rebuilds it as a tokenizers BPE whose leading-space
handling differs from sentencepiece's; the model was trained on sentencepiece's ids).
Two transformers behaviours are deliberately left out:
  - model-specific tokenizer classes (LlamaTokenizer, ...) in transformers 5 rebuild the
    normalizer/pre-tokenizer from the class instead of tokenizer.json; we use tokenizer.json as saved.
  - `clean_up_tokenization_spaces`: transformers 5 ignores it for BPE models, which every supported
    LLM is; applying it would also break streaming (it deletes spaces after the fact).
"""

import functools
import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import sentencepiece
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from blitzgen.errors import BlitzgenError


def _read_json(path: Path) -> dict:
    """A JSON file's object, {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BlitzgenError(f"{path}: not valid JSON ({exc})") from None


def _token_content(value) -> str | None:
    # tokenizer_config.json writes special tokens as plain strings or as AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


def _as_id_list(value) -> list[int]:
    # config.json / generation_config.json write eos_token_id as null, an int, or a list of ints.
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


class Tokenizer:
    """One checkpoint's tokenizer, backed by `tokenizers` (tokenizer.json) or sentencepiece."""

    def __init__(self, fast: tokenizers.Tokenizer | None, spm: sentencepiece.SentencePieceProcessor | None,
                 config: dict, chat_template: str | None, extra_eos_ids: list[int]):
        assert (fast is None) != (spm is None)
        self._fast, self._spm = fast, spm
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        if spm is not None:
            # Without tokenizer_config.json a Llama-2-style .model still names its own bos/eos pieces.
            self.bos_token = self.bos_token or (spm.id_to_piece(spm.bos_id()) if spm.bos_id() >= 0 else None)
            self.eos_token = self.eos_token or (spm.id_to_piece(spm.eos_id()) if spm.eos_id() >= 0 else None)
        self.bos_id = self.token_to_id(self.bos_token) if self.bos_token else None
        eos_id = self.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_ids = frozenset(([eos_id] if eos_id is not None else []) + extra_eos_ids)
        self._eos_id = eos_id
        self._chat_template = chat_template
        if fast is not None:
            self.vocab_size = fast.get_vocab_size(with_added_tokens=True)
        else:
            self.vocab_size = spm.get_piece_size()
            # A .model has no post-processor; these flags are Llama 2's way of asking for BOS. transformers
            # defaults both to False when the config is silent, and so does sentencepiece.
            self._add_bos = bool(config.get("add_bos_token", False)) and self.bos_id is not None
            self._add_eos = bool(config.get("add_eos_token", False)) and eos_id is not None
            # sentencepiece never matches control pieces (<s>, </s>) in text, but chat templates write them
            # as text, so we split them out first, as transformers does with its special tokens.
            self._spm_special = {spm.id_to_piece(i): i for i in range(self.vocab_size)
                                 if spm.is_control(i) or spm.is_unknown(i)}
            self._spm_special_ids = frozenset(self._spm_special.values())
            # Longest first, so one name that starts another cannot cut it. Never empty: every model has <unk>.
            names = sorted(self._spm_special, key=len, reverse=True)
            self._spm_split = re.compile("(" + "|".join(map(re.escape, names)) + ")")

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        fast = spm = None
        if (path / "tokenizer.json").is_file():
            try:
                fast = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as exc:  # tokenizers raises a bare Exception on any parse error
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise BlitzgenError(f"{path / 'tokenizer.json'}: not a valid tokenizer.json ({reason})") from None
        elif (path / "tokenizer.model").is_file():
            spm = sentencepiece.SentencePieceProcessor()
            try:
                spm.load(str(path / "tokenizer.model"))
            except (OSError, RuntimeError) as exc:
                raise BlitzgenError(f"{path / 'tokenizer.model'}: not a sentencepiece model ({exc})") from None
        else:
            raise BlitzgenError(f"{path}: no tokenizer found; expected tokenizer.json or tokenizer.model")

        # transformers 5 saves the template to chat_template.jinja, and that file wins over the config entry.
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")

        extra_eos = []
        for name in ("config.json", "generation_config.json"):
            extra_eos += _as_id_list(_read_json(path / name).get("eos_token_id"))
        return cls(fast, spm, config, template, extra_eos)

    def token_to_id(self, token: str) -> int | None:
        if self._fast is not None:
            return self._fast.token_to_id(token)
        token_id = self._spm.piece_to_id(token)
        # sentencepiece answers unk_id for pieces it does not know.
        return None if self._spm.is_unknown(token_id) and token != self._spm.id_to_piece(token_id) else token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._fast is not None:
            # tokenizer.json's post-processor alone adds BOS/EOS (it is what gives Llama 3 its BOS):
            # transformers 5 drops add_bos_token/add_eos_token from tokenizer_config.json whenever a
            # tokenizer.json exists, so we ignore them too; adding a BOS ourselves would double it.
            return self._fast.encode(text, add_special_tokens=add_special_tokens).ids
        ids = []
        for part in self._spm_split.split(text):
            if part in self._spm_special:
                ids.append(self._spm_special[part])
            elif part:
                # Each piece gets sentencepiece's dummy-prefix space, as in Meta's Llama 2 reference,
                # which encodes "[INST] ..." after a separate BOS id.
                ids += self._spm.encode(part)
        if add_special_tokens:
            ids = ([self.bos_id] if self._add_bos else []) + ids + ([self._eos_id] if self._add_eos else [])
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            return self._spm.decode([i for i in ids if i not in self._spm_special_ids])
        # sentencepiece drops control ids when decoding, so write them ourselves between runs of
        # ordinary ids; each run decodes like the text piece encode() made it from.
        text, run = [], []
        for token_id in ids:
            if token_id in self._spm_special_ids:
                text += [self._spm.decode(run), self._spm.id_to_piece(token_id)]
                run = []
            else:
                run.append(token_id)
        return "".join(text) + self._spm.decode(run)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._chat_template is None:
            raise BlitzgenError("this tokenizer has no chat template (looked for chat_template.jinja and "
                                "a chat_template entry in tokenizer_config.json)")
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        # As transformers: keys set to None are dropped (templates test for presence), and tools/documents are
        # defined as None, since templates test `tools is not none`, which an undefined name would pass.
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        try:
            return _compile_template(self._chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **{name: value for name, value in variables.items() if value is not None})
        except jinja2.TemplateError as exc:
            # Mostly raise_exception() refusing the messages, e.g. roles that do not alternate.
            raise BlitzgenError(f"chat template refused the messages: {exc}") from None


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' training masks;
    templates that use it must still parse, and rendering is just the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers replaces jinja's tojson, which escapes <, >, & and ' for HTML; tool schemas must not be.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    # The same environment as transformers' _compile_jinja_template: templates come from the Hub, so sandboxed.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise BlitzgenError(f"chat template line {exc.lineno}: {exc.message}") from None


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get back only text that is final.

    Decoding one id alone is wrong in two ways: a byte-level token can end inside a multi-byte UTF-8
    character (it decodes to U+FFFD until the rest arrives), and sentencepiece-style decoders strip the
    leading space of the first token they see. So, as vLLM and TGI do, we decode a short window of
    already-emitted ids (`prefix`) with and without the new ids and emit the difference; both decodes
    start at the same id, so whatever the decoder does at the window's start cancels out. Only the ids of
    the last emitted piece and the ones not yet emitted are kept, so each push costs O(1).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # the window
        self._read = 0  # ids[:read] are the last emitted piece, ids[read:] are not emitted yet

    def _pending_text(self) -> tuple[str, str]:
        prefix = self._tokenizer.decode(self._ids[: self._read], self._skip)
        full = self._tokenizer.decode(self._ids, self._skip)
        return prefix, full

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix, full = self._pending_text()
        # A trailing U+FFFD is a character still missing bytes; wait for them. (Text that really ends in
        # U+FFFD is held back only until the next character, or flush().)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        return full[len(prefix):]

    def flush(self) -> str:
        prefix, full = self._pending_text()
        self._ids, self._read = [], 0
        return full[len(prefix):]
