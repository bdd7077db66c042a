"""blitzgen.tokenizer against transformers and sentencepiece, on tokenizers trained here in seconds.

No hub: each fixture trains a small tokenizer, writes it in the layout a real checkpoint uses, and
every test compares our Tokenizer with what transformers (or sentencepiece) makes of the same folder.
"""

import io
import json

import pytest
import sentencepiece
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from blitzgen.errors import BlitzgenError
from blitzgen.tokenizer import StreamDecoder, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces, and    runs of spaces, matter to a tokenizer.",
    "Numbers like 12345 and 3.14 appear in text.",
    "Accents: café, naïve, résumé, Ångström.",
    "中文字符和日本語のテキスト。",
    "Emoji 🙂 and 🚀 show up in chats.",
    "def add(x, y):\n    return x + y\n",
    "<b>Markup</b> & 'quotes' \"here\".",
]
# Characters that are NOT in CORPUS, so byte-level BPE and sentencepiece byte fallback both split them
# into single-byte tokens, which decode to U+FFFD alone: that is what StreamDecoder must hold back.
UNSEEN = "🦀 漢字 ß€ 𝄞 Zürich"
TEXTS = [
    "Hello world",
    "The café serves naïve résumés.",
    " leading space",
    "   three leading spaces and  two inside",
    "line one\nline two\n\n  indented\tTab",
    "emoji 🙂🚀 and CJK 中文 日本語",
    UNSEEN,
    "",
]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eom_id|>", "<|eot_id|>"]
# Qwen-style ChatML, written with plain block tags on their own indented lines: it renders right only
# with transformers' trim_blocks and lstrip_blocks.
CHATML_TEMPLATE = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are helpful.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}{% if 'tool_calls' in message %} calling tools{% endif %}

    {% if message['role'] == 'tool' %}
{{ message['content'] | tojson }}<|im_end|>
    {% else %}
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{%- if tools is not none %}
    {{- "Tools: " + tools | tojson + "\\n\\n" }}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant'] %}
        {{- raise_exception("Only user and assistant roles are supported!") }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
MESSAGES = [
    {"role": "system", "content": "  Be brief. "},
    {"role": "user", "content": "What is 2+2? 🙂"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And <b>3+3</b>?"},
]


def train_byte_level_bpe(special_tokens: list[str]) -> HFTokenizer:
    """A GPT-2 / Llama 3 style tokenizer: byte-level pre-tokenizer and decoder, every byte in the alphabet."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    return tokenizer


def write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory):
    """Saved by transformers itself: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
    path = tmp_path_factory.mktemp("byte_level")
    tokenizer = train_byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>",
                                                   eos_token="<|im_end|>")
    wrapped.chat_template = CHATML_TEMPLATE
    wrapped.save_pretrained(path)
    return path


def write_llama3_dir(path, tokenizer_config: dict):
    """The layout of meta-llama/Llama-3.1-8B-Instruct: the BOS comes from tokenizer.json's post-processor."""
    tokenizer = train_byte_level_bpe(LLAMA3_SPECIALS)
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tokenizer.token_to_id(bos))]),
    ])
    tokenizer.save(str(path / "tokenizer.json"))
    write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_TEMPLATE, **tokenizer_config})
    ids = {token: tokenizer.token_to_id(token) for token in LLAMA3_SPECIALS}
    write_json(path / "config.json", {"eos_token_id": ids["<|end_of_text|>"]})
    # Each file names a different part of the set, so eos_ids must be their union.
    write_json(path / "generation_config.json", {"bos_token_id": ids[bos],
                                                 "eos_token_id": [ids["<|eom_id|>"], ids["<|eot_id|>"]]})
    return path


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return write_llama3_dir(tmp_path_factory.mktemp("llama3"), {})


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    """Llama 2 layout: tokenizer.model only. Trainer flags as in Llama 2's model: BPE, byte fallback,
    no normalization, spaces kept as they are, a dummy-prefix space."""
    path = tmp_path_factory.mktemp("sentencepiece")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 5), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "eos_token": "</s>", "unk_token": "<unk>"})
    return path


def reference_sentencepiece(path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))


# ---------------------------------------------------------------------------------------------------
# tokenizer.json


def test_byte_level_matches_transformers(byte_level_dir):
    reference = transformers.AutoTokenizer.from_pretrained(byte_level_dir)
    tokenizer = Tokenizer.from_dir(byte_level_dir)
    assert tokenizer.vocab_size == len(reference)
    assert tokenizer.bos_id == reference.bos_token_id
    assert tokenizer.eos_ids == {reference.eos_token_id}
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        for add_special_tokens in (False, True):
            ids = tokenizer.encode(text, add_special_tokens)
            assert ids == reference(text, add_special_tokens=add_special_tokens)["input_ids"], text
        for skip in (True, False):
            assert tokenizer.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.token_to_id("<|im_end|>") == reference.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.token_to_id("<|no such token|>") is None


@pytest.mark.parametrize("tokenizer_config", [{}, {"add_bos_token": True}, {"add_bos_token": False}],
                         ids=["post_processor_only", "add_bos_true", "add_bos_false"])
def test_llama3_bos_matches_transformers(tmp_path, tokenizer_config):
    # transformers 5 ignores add_bos_token when a tokenizer.json exists: the post-processor's BOS,
    # exactly once, whatever the config says.
    path = write_llama3_dir(tmp_path, tokenizer_config)
    reference = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer = Tokenizer.from_dir(path)
    bos = reference.convert_tokens_to_ids("<|begin_of_text|>")
    assert tokenizer.bos_id == bos
    for text in TEXTS + ["<|begin_of_text|>already there"]:
        for add_special_tokens in (True, False):
            ids = tokenizer.encode(text, add_special_tokens)
            assert ids == reference(text, add_special_tokens=add_special_tokens)["input_ids"], text
    assert tokenizer.encode("Hello world").count(bos) == 1
    assert tokenizer.encode("Hello world", add_special_tokens=False).count(bos) == 0


def test_eos_ids_from_all_configs(llama3_dir):
    reference = transformers.AutoTokenizer.from_pretrained(llama3_dir)
    tokenizer = Tokenizer.from_dir(llama3_dir)
    expected = {reference.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")}
    assert tokenizer.eos_ids == expected
    assert isinstance(tokenizer.eos_ids, frozenset)


# ---------------------------------------------------------------------------------------------------
# tokenizer.model (sentencepiece)
#
# transformers 5 cannot read a bare tokenizer.model without protobuf (not in our test dependencies), and
# with it converts the model to a tokenizers BPE whose Metaspace pre-tokenizer treats leading spaces and
# text after special tokens differently from sentencepiece. The model was trained on sentencepiece's ids,
# so sentencepiece itself is the reference here; the transformers comparison runs only where protobuf is.


def test_sentencepiece_matches_sentencepiece(sentencepiece_dir):
    reference = reference_sentencepiece(sentencepiece_dir)
    tokenizer = Tokenizer.from_dir(sentencepiece_dir)
    assert tokenizer.vocab_size == reference.get_piece_size()
    assert tokenizer.bos_id == reference.bos_id()
    assert tokenizer.eos_ids == {reference.eos_id()}
    for text in TEXTS:
        # Llama 2 (add_bos_token) prepends one BOS to sentencepiece's ids.
        assert tokenizer.encode(text) == [reference.bos_id()] + reference.encode(text), text
        assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text)
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=True) == reference.decode(ids) == text
    assert any(reference.is_byte(i) for i in reference.encode(UNSEEN)), "byte fallback is not exercised"


def test_sentencepiece_splits_special_tokens_like_meta_reference(sentencepiece_dir):
    # A rendered Llama 2 chat prompt starts with the text "<s>"; Meta's llama/generation.py encodes the
    # same prompt as [bos] + sp.encode("[INST] ... [/INST]"). sentencepiece alone would spell out "<s>".
    reference = reference_sentencepiece(sentencepiece_dir)
    tokenizer = Tokenizer.from_dir(sentencepiece_dir)
    prompt = "[INST] Hello there [/INST]"
    ids = tokenizer.encode("<s>" + prompt, add_special_tokens=False)
    assert ids == [reference.bos_id()] + reference.encode(prompt)
    assert tokenizer.decode(ids) == "<s>" + prompt
    assert tokenizer.decode(ids + [reference.eos_id()], skip_special_tokens=True) == prompt


def test_sentencepiece_matches_transformers_with_protobuf(sentencepiece_dir):
    pytest.importorskip("google.protobuf", reason="transformers 5 reads tokenizer.model through protobuf")
    reference = transformers.AutoTokenizer.from_pretrained(sentencepiece_dir)
    tokenizer = Tokenizer.from_dir(sentencepiece_dir)
    # Only texts without leading whitespace: there transformers 5 drops a space sentencepiece keeps.
    for text in [t for t in TEXTS if t and not t[0].isspace()]:
        assert tokenizer.encode(text) == reference(text)["input_ids"], text
        assert tokenizer.decode(tokenizer.encode(text), True) == reference.decode(tokenizer.encode(text), True)


# ---------------------------------------------------------------------------------------------------
# StreamDecoder

STREAM_TEXT = "  Hello,  world! café naïve 🙂🚀 🦀 中文 漢字 ß€𝄞\n  indented line\nend"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("directory", ["byte_level_dir", "llama3_dir", "sentencepiece_dir"])
def test_stream_decoder_matches_decode(request, directory, skip_special_tokens):
    tokenizer = Tokenizer.from_dir(request.getfixturevalue(directory))
    # BOS first and an EOS in the middle, as a generation that continues past a turn would give.
    ids = tokenizer.encode(STREAM_TEXT) + sorted(tokenizer.eos_ids)[:1] + tokenizer.encode(" more", False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "no token splits a character"
    stream = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens)
    if directory != "sentencepiece_dir":  # and the same text as transformers gives
        reference = transformers.AutoTokenizer.from_pretrained(request.getfixturevalue(directory))
        assert "".join(pieces) == reference.decode(ids, skip_special_tokens=skip_special_tokens)


def test_stream_decoder_keeps_a_short_window(sentencepiece_dir):
    tokenizer = Tokenizer.from_dir(sentencepiece_dir)
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 50)
    stream = StreamDecoder(tokenizer)
    pieces, window_sizes = [], []
    for token_id in ids:
        pieces.append(stream.push(token_id))
        window_sizes.append(len(stream._ids))
    assert "".join(pieces) + stream.flush() == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(window_sizes) <= 4  # O(1) per token: the window does not grow with the history


# ---------------------------------------------------------------------------------------------------
# Chat templates


def test_chatml_template_from_chat_template_jinja(byte_level_dir):
    # transformers 5 saved CHATML_TEMPLATE to chat_template.jinja, not into tokenizer_config.json.
    assert (byte_level_dir / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((byte_level_dir / "tokenizer_config.json").read_text())
    reference = transformers.AutoTokenizer.from_pretrained(byte_level_dir)
    tokenizer = Tokenizer.from_dir(byte_level_dir)
    messages = MESSAGES[1:] + [{"role": "tool", "content": "<b>6</b> & 'ok'", "tool_calls": None}]
    for add_generation_prompt in (True, False):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt)
        assert text == reference.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)
        expected_ids = reference.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                     add_generation_prompt=add_generation_prompt)["input_ids"]
        assert tokenizer.encode(text, add_special_tokens=False) == expected_ids


def test_llama3_template_from_tokenizer_config(llama3_dir):
    reference = transformers.AutoTokenizer.from_pretrained(llama3_dir)
    tokenizer = Tokenizer.from_dir(llama3_dir)
    text = tokenizer.apply_chat_template(MESSAGES)
    assert text == reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == reference.apply_chat_template(MESSAGES, tokenize=True, return_dict=True,
                                                add_generation_prompt=True)["input_ids"]
    assert ids.count(tokenizer.bos_id) == 1 and ids[0] == tokenizer.bos_id


def test_named_templates_take_default_and_jinja_file_wins(tmp_path):
    path = write_llama3_dir(tmp_path, {"chat_template": [{"name": "tool_use", "template": "TOOLS"},
                                                         {"name": "default", "template": CHATML_TEMPLATE}]})
    reference = transformers.AutoTokenizer.from_pretrained(path)
    assert Tokenizer.from_dir(path).apply_chat_template(MESSAGES) == reference.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)
    (path / "chat_template.jinja").write_text(LLAMA3_TEMPLATE, encoding="utf-8")
    reference = transformers.AutoTokenizer.from_pretrained(path)
    text = Tokenizer.from_dir(path).apply_chat_template(MESSAGES)
    assert text == reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system")


def test_generation_tag_renders_its_body(tmp_path):
    # transformers' {% generation %} tag (assistant masks for training) must parse and render as text.
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]"
                "{% endgeneration %}{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}")
    path = write_llama3_dir(tmp_path, {"chat_template": template})
    reference = transformers.AutoTokenizer.from_pretrained(path)
    assert Tokenizer.from_dir(path).apply_chat_template(MESSAGES, False) == reference.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=False)


def test_template_raise_exception_is_a_blitzgen_error(llama3_dir):
    messages = [{"role": "tool", "content": "x"}]
    with pytest.raises(Exception, match="Only user and assistant roles"):  # transformers refuses them too
        transformers.AutoTokenizer.from_pretrained(llama3_dir).apply_chat_template(messages, tokenize=False)
    with pytest.raises(BlitzgenError, match="Only user and assistant roles"):
        Tokenizer.from_dir(llama3_dir).apply_chat_template(messages)


# ---------------------------------------------------------------------------------------------------
# Errors


def test_empty_directory(tmp_path):
    with pytest.raises(BlitzgenError, match="tokenizer.json or tokenizer.model") as excinfo:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(excinfo.value)


def test_malformed_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ', encoding="utf-8")
    with pytest.raises(BlitzgenError, match="tokenizer.json") as excinfo:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(excinfo.value)


def test_malformed_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a protobuf")
    with pytest.raises(BlitzgenError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_tokenizer_config(tmp_path, byte_level_dir):
    (tmp_path / "tokenizer.json").write_bytes((byte_level_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(BlitzgenError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_no_chat_template(sentencepiece_dir):
    tokenizer = Tokenizer.from_dir(sentencepiece_dir)
    assert tokenizer.chat_template is None
    with pytest.raises(BlitzgenError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
