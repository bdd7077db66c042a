"""ChatSession: the template is applied each turn, the cache is reused across turns, and a
reply equals what a fresh engine gives for the same rendered conversation."""

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import blitzgen
from blitzgen.chat import ChatSession

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = "Now is the winter of our discontent made glorious summer by this sun of York. " * 20


def _save_model(path, chat_template):
    tok = HFTokenizers(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    Qwen2ForCausalLM(config).save_pretrained(path)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chatml")
    _save_model(path, CHATML)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    _save_model(path, None)
    return path


GREEDY = blitzgen.SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)


def test_turns_reuse_the_cache_and_match_a_fresh_engine(chat_dir):
    generator = blitzgen.load(chat_dir, device="cpu")
    seen = []  # (prompt ids, generated ids) of each turn, as the engine saw them
    stream = generator.stream

    def spy(prompts, params):
        events = list(stream(prompts, params))
        seen.append((list(prompts[0]), [e.token_id for e in events]))
        yield from events

    generator.stream = spy
    session = ChatSession(generator, GREEDY, system="Be brief.")
    first = "".join(session.send("Who is York?"))
    second = "".join(session.send("And the sun?"))
    tokenizer = generator.tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who is York?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And the sun?"},
    ]
    assert session.messages == messages + [{"role": "assistant", "content": second}]

    # The second prompt is the first prompt and reply, token for token, then the new turn.
    (prompt1, reply1), (prompt2, _) = seen
    new_turn = "<|im_end|>\n<|im_start|>user\nAnd the sun?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt1 == tokenizer.encode(tokenizer.apply_chat_template(messages[:2]), add_special_tokens=False)
    assert prompt2 == prompt1 + reply1 + tokenizer.encode(new_turn, add_special_tokens=False)
    assert tokenizer.decode(prompt2) == tokenizer.apply_chat_template(messages)
    # Only what the cache does not hold is prefilled: the last reply token (never fed back) and the new turn.
    assert generator.last_stats.prefilled_tokens == 1 + len(tokenizer.encode(new_turn, add_special_tokens=False))

    fresh = blitzgen.load(chat_dir, device="cpu")
    assert fresh.generate([prompt2], GREEDY)[0].text == second
    assert fresh.last_stats.prefilled_tokens == len(prompt2)


def test_reset_forgets_the_conversation(chat_dir):
    session = ChatSession(blitzgen.load(chat_dir, device="cpu"), GREEDY)
    once = "".join(session.send("Hello"))
    "".join(session.send("More"))
    session.reset()
    assert session.messages == []
    assert "".join(session.send("Hello")) == once


def test_failed_turn_leaves_no_half_turn(chat_dir):
    generator = blitzgen.load(chat_dir, device="cpu", max_seq_len=40)
    session = ChatSession(generator, GREEDY)
    "".join(session.send("Hi"))
    before = list(session.messages)
    with pytest.raises(blitzgen.BlitzgenError, match="context"):
        "".join(session.send("word " * 40))
    assert session.messages == before


def test_base_model_continues_the_raw_transcript(base_dir):
    generator = blitzgen.load(base_dir, device="cpu")
    session = ChatSession(generator, GREEDY)
    assert not session.templated
    reply = "".join(session.send("Now is the winter"))
    assert session.transcript == "Now is the winter" + reply
    expected = generator.generate([generator.tokenizer.encode("Now is the winter")], GREEDY)[0].text
    assert reply == expected
    "".join(session.send("of our"))
    assert session.transcript.startswith("Now is the winter" + reply + "\nof our")
