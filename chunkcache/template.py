"""Prompt template: the token geometry of a RAG prompt, built from the tokenizer's chat template.

    position: 0 ........ P-1 | P ..... | ....... | ............. N-1
              [   prefix    ][ chunk 1 ][ chunk 2 ][ question suffix ]
              system + user   each tokenised       question + end of turn
              header + instr  on its own           + generation prompt

Each chunk is tokenised on its own (``"{text}\\n\\n"``), so its ids never depend on where it lands,
and the prompt's ``input_ids`` are the concatenation of the pieces. Full prefill and fusion see
the very same ids, which makes their comparison exact. The prefix is identical for every query
and is reused exactly.

What it does not know: models, caches, positions of anything but token counts.

    t = PromptTemplate.from_tokenizer(tok)
    ids = t.build([t.chunk_ids("Paris is ..."), t.chunk_ids("Rome is ...")], "Where is ...?")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_INSTRUCTION = (
    "Answer the question using the passages below. Reply with a short answer only, without explanation."
)
DEFAULT_SYSTEM = "You are a helpful assistant."
# The made-up passages of the ``context`` sink: generic, about no subject, in no data set; each
# laid out as a chunk (``chunk_format``). Fixed: they are part of every key of that sink.
CONTEXT_SINK_PASSAGES = (
    "Reference\nThis passage is one of several reference passages. It describes a single subject and "
    "gives its names, places and dates as they are recorded.",
    "Notes\nThe records below were collected from several sources. Each entry is kept as it was "
    "written, with the names and numbers that the sources give.",
)
_CHUNKS = "\x00CHUNKS\x00"
_QUESTION = "\x00QUESTION\x00"


@dataclass(frozen=True)
class PromptTemplate:
    """The fixed text around the chunks, as strings; token ids derived with ``tokenizer``."""

    tokenizer: object
    """A Hugging Face tokenizer."""
    prefix: str
    """Everything before the first chunk (chat header, system prompt, instruction)."""
    suffix: str
    """Everything after the last chunk, with ``{question}`` in it."""
    chunk_format: str = "{text}\n\n"
    """How one chunk's text is laid out; tokenised on its own."""

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer,
        instruction: str = DEFAULT_INSTRUCTION,
        system: str | None = DEFAULT_SYSTEM,
    ) -> PromptTemplate:
        """Split the chat template's rendering of one user turn around the chunks and question.
        Tokenizers without a chat template get a plain ``instruction / passages / Question: / Answer:``."""
        user = f"{instruction}\n\n{_CHUNKS}Question: {_QUESTION}"
        if getattr(tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": user}
            ]
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # some templates reject a system role
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
                )
        else:
            bos = tokenizer.bos_token or ""
            text = f"{bos}{user}\nAnswer:"
        prefix, rest = text.split(_CHUNKS)
        before_q, after_q = rest.split(_QUESTION)
        return cls(tokenizer=tokenizer, prefix=prefix, suffix=before_q + "{question}" + after_q)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prefix_ids(self) -> list[int]:
        return self.encode(self.prefix)

    def chunk_ids(self, text: str) -> list[int]:
        return self.encode(self.chunk_format.format(text=text.strip()))

    def suffix_ids(self, question: str) -> list[int]:
        return self.encode(self.suffix.replace("{question}", question.strip()))

    def sink_ids(self, kind: str, context: tuple[str, ...] = CONTEXT_SINK_PASSAGES) -> list[int]:
        """The tokens a chunk is encoded behind: ``bos`` (one token), the whole ``prefix``, or
        ``context``: the prefix and the ``context`` passages (default ``CONTEXT_SINK_PASSAGES``)
        laid out as chunks, so that a chunk
        is encoded as a passage that follows other passages, which is where fusion places every
        chunk but the first (measured in bench_results/session8/fidelity/NOTES.md)."""
        if kind == "prefix":
            return self.prefix_ids()
        if kind == "context":
            return self.prefix_ids() + [t for text in context for t in self.chunk_ids(text)]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return [bos] if bos is not None else self.prefix_ids()[:1]

    def build(self, chunk_ids: list[list[int]], question: str) -> torch.Tensor:
        """``[1, N]`` input ids: prefix + chunks (in the given order) + question suffix."""
        ids = self.prefix_ids() + [t for c in chunk_ids for t in c] + self.suffix_ids(question)
        return torch.tensor([ids], dtype=torch.long)
