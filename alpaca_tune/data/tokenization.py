"""Records -> token ids with labels.

The prompt and the response are tokenized separately, so the boundary between the masked prompt
(-100) and the learned response is exact rather than guessed from a re-tokenized prefix. EOS is
appended to every response so the model learns to stop; an example cut at cutoff_len loses its EOS
(it did not end there), and one whose prompt alone fills cutoff_len has nothing to learn and is
dropped. Both are counted and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .prompts import PromptTemplate
from .records import DataError, Record

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
TOKENIZE_CHUNK = 1024  # records per batched tokenizer call


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; IGNORE_INDEX where nothing is learned

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # prompt alone reached cutoff_len: no response token left to learn
    tokens: int = 0
    label_tokens: int = 0
    dropped_records: list[int] = field(default_factory=list)


def eos_id_of(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; the model could not learn to stop")
    return tokenizer.eos_token_id


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids exactly as generation sees them (with BOS when the tokenizer adds one)."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def build_example(prompt_ids: list[int], response_ids: list[int], eos_id: int, cutoff_len: int,
                  train_on_inputs: bool) -> tuple[Example, bool]:
    """(example, was_truncated) from already tokenized parts."""
    target = response_ids + [eos_id]
    input_ids = (prompt_ids + target)[:cutoff_len]
    prompt_labels = prompt_ids if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    labels = (prompt_labels + target)[:cutoff_len]
    return Example(input_ids, labels), len(prompt_ids) + len(target) > cutoff_len


def tokenize_records(records: list[Record], template: PromptTemplate, tokenizer, cutoff_len: int,
                     train_on_inputs: bool, progress: bool = False) -> tuple[list[Example], TokenizeStats]:
    from tqdm.auto import tqdm

    eos_id = eos_id_of(tokenizer)
    stats = TokenizeStats()
    examples: list[Example] = []
    bar = tqdm(total=len(records), desc="tokenizing", unit="rec", disable=not progress)
    for start in range(0, len(records), TOKENIZE_CHUNK):
        chunk = records[start:start + TOKENIZE_CHUNK]
        prompts = tokenizer([template.render(r.instruction, r.input) for r in chunk],
                            add_special_tokens=True)["input_ids"]
        responses = tokenizer([r.output for r in chunk], add_special_tokens=False)["input_ids"]
        for offset, (prompt_ids, response_ids) in enumerate(zip(prompts, responses)):
            example, truncated = build_example(prompt_ids, response_ids, eos_id, cutoff_len,
                                               train_on_inputs)
            if all(label == IGNORE_INDEX for label in example.labels[1:]):
                stats.dropped += 1
                stats.dropped_records.append(start + offset)
                continue
            stats.truncated += truncated
            stats.tokens += len(example)
            stats.label_tokens += sum(label != IGNORE_INDEX for label in example.labels[1:])
            examples.append(example)
        bar.update(len(chunk))
    bar.close()
    stats.examples = len(examples)
    return examples, stats
