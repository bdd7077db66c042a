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
        self.generator.reset()

    def _prompt_ids(self, user_text: str) -> list[int]:
        tokenizer = self.generator.tokenizer
        if self.templated:
            self.messages.append({"role": "user", "content": user_text})
            text = tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
            return tokenizer.encode(text, add_special_tokens=False)  # the template already wrote BOS if any
        self.transcript += ("\n" if self.transcript else "") + user_text
        return tokenizer.encode(self.transcript)

    def send(self, user_text: str) -> Iterator[str]:
        """Stream the reply to `user_text`, piece by piece; the reply joins the history at the end."""
        ids = self._prompt_ids(user_text)
        reply = []
        try:
            for event in self.generator.stream([ids], self.params):
                reply.append(event.text)
                yield event.text
        except BaseException:
            # A failed or interrupted turn leaves no half-turn behind in the history.
            if self.templated:
                self.messages.pop()
            else:
                self.transcript = self.transcript[: -len(user_text)].rstrip("\n")
            raise
        if self.templated:
            self.messages.append({"role": "assistant", "content": "".join(reply)})
        else:
            self.transcript += "".join(reply)
