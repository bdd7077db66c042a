"""ChatSession: a multi-turn conversation over one Generator cache slot.

Each turn renders the whole conversation with the checkpoint's own chat template and
hands the ids to the Generator, whose slot still holds the previous turns: only the new
tokens are prefilled, however long the history. A base model without a template
continues the raw transcript instead. Generation stops on any end-of-turn / eos id the
tokenizer knows.
"""

from collections.abc import Iterator

from blitzgen.generate import Generator
from blitzgen.sampling import SamplingParams


class ChatSession:
    def __init__(self, generator: Generator, params: SamplingParams, system: str | None = None):
        self.generator, self.params, self.system = generator, params, system
        self.templated = generator.tokenizer.chat_template is not None
        self.reset()

    def reset(self):
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.transcript = ""  # raw text so far, for models without a chat template
        # The last turn as the model saw it: prompt text and ids, and the reply's ids and text.
        self._last: tuple[str, list[int], list[int], str] | None = None
        self.generator.reset()

    def _prompt(self, user_text: str) -> tuple[str, list[int]]:
        """The conversation so far plus `user_text`, as text and as the ids to generate from."""
        tokenizer = self.generator.tokenizer
        if self.templated:
            self.messages.append({"role": "user", "content": user_text})
            text = tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        else:
            self.transcript += ("\n" if self.transcript else "") + user_text
            text = self.transcript
        # Re-encoding the history would not always give back the ids the model generated (BPE has
        # several spellings of one text), and the cache would then be re-read from the first
        # difference. When the new rendering extends the last prompt + reply, reuse their ids exactly.
        if self._last is not None:
            last_text, last_ids, reply_ids, reply_text = self._last
            if text.startswith(last_text + reply_text):
                rest = text[len(last_text + reply_text):]
                return text, last_ids + reply_ids + tokenizer.encode(rest, add_special_tokens=False)
        return text, tokenizer.encode(text, add_special_tokens=not self.templated)  # a template writes its own BOS

    def send(self, user_text: str) -> Iterator[str]:
        """Stream the reply to `user_text`, piece by piece; the reply joins the history at the end."""
        tokenizer = self.generator.tokenizer
        prompt_text, ids = self._prompt(user_text)
        reply, reply_ids = [], []
        try:
            for event in self.generator.stream([ids], self.params):
                reply.append(event.text)
                if event.token_id not in tokenizer.eos_ids:
                    reply_ids.append(event.token_id)
                yield event.text
        except BaseException:
            # A failed or interrupted turn leaves no half-turn behind in the history.
            if self.templated:
                self.messages.pop()
            else:
                self.transcript = self.transcript[: -len(user_text)].rstrip("\n")
            raise
        reply_text = "".join(reply)
        # Reuse the reply's ids only if they spell exactly the reply (not so when a stop string cut it).
        exact = tokenizer.decode(reply_ids) == reply_text
        self._last = (prompt_text, ids, reply_ids, reply_text) if exact else None
        if self.templated:
            self.messages.append({"role": "assistant", "content": reply_text})
        else:
            self.transcript += reply_text
