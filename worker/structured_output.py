"""Structured outputs: a sequence's tokens constrained to a grammar (a JSON Schema, any JSON object,
a regular expression, a choice of strings, or an EBNF/Lark grammar), through llguidance.

`GrammarCompiler` turns a request's StructuredOutput into a `Grammar` for the model's tokenizer,
in the request path (the server calls it in a thread, before the request enters the engine), and
keeps the last compiled grammars in an LRU cache keyed by the spec. Each constrained sequence gets
its own `GrammarMatcher`. Each step, after the forward pass is queued on the device, `fill_masks`
computes on the host the allowed tokens of every constrained row (and, for a sequence verifying
drafts, of each drafted position, the matcher advanced over the drafts and rolled back), and
`apply_token_bitmask` sets the other tokens' logits to -inf on the device, leaving the rows of
unconstrained sequences as they were. The engine advances a matcher with each token in its one
post-step update; a matcher that can take no token but EOS ends its sequence ("stop").

Why llguidance and not xgrammar (bench/grammar_engines.py, bench/results/structured-output-engine.md;
this CPU machine, 2026-12-07, SmolLM2's tokenizer, vocabulary 49152, twenty JSON schemas):

    measure                               xgrammar 0.2.8   llguidance 1.9.1
    tokenizer index build                 0.36-0.38 s      0.88-1.01 s
    compile 20 schemas (to first mask)    4.1-6.0 s        32-37 ms
    slowest schema                        1.65-2.84 s      5.8-7.0 ms
    mask fill per token, median           2 us             25-26 us
    mask fill per token, p99              12-14 ms         0.66-0.75 ms
    mask fill per token, mean             0.37-0.88 ms     75-93 us
    dependencies                          torch, transformers, apache-tvm-ffi, and triton (198 MB)
                                          on Linux x86_64; llguidance: none (a 3 MB wheel)

xgrammar precomputes masks at compile time: seconds per schema here, which a request would wait
for; its fills are fast where the precomputation covers the state and slow (milliseconds) where it
does not, which a whole batch waits for. llguidance compiles lazily and fills every mask in tens
of microseconds, in parallel across the batch's sequences, and adds no dependency.
"""

import functools
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llguidance
import torch
from tokenizers import Tokenizer

from kvflock.worker.config import StructuredOutput
from kvflock.worker.step_plan import ScheduledSequence
from kvflock.worker.transfer import to_device

# JSON is laid out as json.dumps does by default (", " and ": "), with no other whitespace: free
# whitespace lets a small model fill its max_tokens with newlines instead of values. Keywords that
# llguidance cannot enforce (uniqueItems) are ignored rather than refused, as vLLM and xgrammar do.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}
_BITS = 32  # tokens per word of a bitmask row


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def accept(self, token_id: int) -> None:
        """Advance over the sequence's next token; a ValueError when the grammar refuses it."""
        if not self._matcher.consume_token(token_id):
            raise ValueError(f"structured_output: token {token_id} does not follow the grammar "
                             f"({self._matcher.get_error()})")

    @property
    def is_terminated(self) -> bool:
        """Nothing but EOS may follow: the output is complete."""
        return self._matcher.is_stopped()


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled grammar: a matcher at its start, copied for each sequence that uses it."""

    _start: llguidance.LLMatcher

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._start.deep_copy())


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer and remembers the last `cache_size` of them.
    Safe to call from several threads at once."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...], cache_size: int = 256) -> None:
        # The tokenizer's definition is read now, on the engine's thread: a fast tokenizer used by
        # two threads at once can fail, and compiling runs on others. The index built from it
        # takes a second, so it is built when the first constrained request arrives.
        backend = getattr(tokenizer, "backend_tokenizer", None)  # None: no tokenizer, or a slow (Python) one
        self._definition = None if backend is None else backend.to_str()
        self.vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._index: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutput) -> Grammar:
        """The grammar of `spec`; a ValueError naming the spec's field when it does not compile."""
        key = spec.model_dump_json()
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                return grammar
        field, text = _grammar_text(spec)
        matcher = llguidance.LLMatcher(self._tokenizer_index(), text, log_level=0)
        if matcher.is_error():
            raise ValueError(f"{field}: does not compile: {matcher.get_error()}")
        grammar = Grammar(matcher)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _tokenizer_index(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._index is None:
                if self._definition is None:
                    raise ValueError("structured_output: this model has no fast (tokenizers) tokenizer, so its "
                                     "output cannot be constrained")
                backend = Tokenizer.from_str(self._definition)
                backend.no_padding()  # padding or truncation would change how llguidance tokenizes text
                backend.no_truncation()
                # Ids past the tokenizer's vocabulary (a model's padded embedding) are never allowed.
                self._index = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                                                     eos_token=self._eos_token_ids)
            return self._index


def _grammar_text(spec: StructuredOutput) -> tuple[str, str]:
    """The spec's field and its llguidance grammar; a ValueError naming the field when it cannot
    be read (errors inside a grammar show when it is compiled)."""
    field = next(name for name, value in spec if value not in (None, False))
    try:
        if spec.json_schema is not None:
            text = llguidance.LLMatcher.grammar_from_json_schema(_closed(spec.json_schema), defaults=_JSON_OPTIONS)
        elif spec.json_object:
            text = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        elif spec.regex is not None:
            text = llguidance.grammar_from("regex", spec.regex)
        elif spec.choice is not None:
            text = llguidance.grammar_from("choice", json.dumps(spec.choice))
        else:
            assert spec.grammar is not None
            text = llguidance.grammar_from("grammar", spec.grammar)  # GBNF (root ::= ...) or Lark
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{field}: does not compile: {exc}") from None
    return field, text


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "contains", "not", "if", "then", "else")


def _closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others (unless it says
    otherwise), as OpenAI's strict mode and xgrammar do: JSON Schema allows unlisted properties by
    default, and a model given the choice writes them on until max_tokens. What it then writes
    still validates against the schema as given. Objects under allOf stay as they are (closing
    one branch would refuse the properties another adds)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(sub) for sub in out[key]]
    for key in _SCHEMAS:
        if key in out:
            out[key] = _closed(out[key])
    return out


@dataclass
class StepMasks:
    """The allowed tokens of a step's constrained logits rows: `bitmask[i]` (host, int32, bit j of
    word w allows token 32 * w + j) is the mask of row `rows[i]`."""

    rows: list[int]
    bitmask: torch.Tensor

    def select(self, rows: list[int]) -> "StepMasks | None":
        """The masks of the logits rows `rows` (in that order), renumbered as rows of
        logits[rows]; None when none of them is constrained."""
        index = {row: i for i, row in enumerate(self.rows)}
        kept = [(new, index[row]) for new, row in enumerate(rows) if row in index]
        if not kept:
            return None
        return StepMasks([new for new, _ in kept], self.bitmask[[i for _, i in kept]])


@functools.cache
def _executor() -> llguidance.LLExecutor:
    """Threads that fill the rows of a step's masks in parallel, without the GIL."""
    return llguidance.LLExecutor()


def fill_masks(items: list[ScheduledSequence], vocab_size: int) -> StepMasks | None:
    """The masks of a step's sampling items (in the order of the logits' rows: one row per item,
    1 + num_draft_tokens for one that verifies drafts), None when no item is constrained. A
    drafted row's mask is the grammar's after the drafts before it; the matcher is left where
    it was. Finished sequences (their row is dropped) are not constrained."""
    rows: list[int] = []
    plain: list[tuple[llguidance.LLMatcher, int]] = []
    drafted: list[tuple[llguidance.LLMatcher, int, list[int]]] = []
    row = 0
    for item in items:
        seq = item.seq
        if seq.grammar is not None and not seq.is_finished:
            if item.draft_token_ids:
                drafted.append((seq.grammar._matcher, len(rows), item.draft_token_ids))
            else:
                plain.append((seq.grammar._matcher, len(rows)))
            rows.extend(range(row, row + 1 + item.num_draft_tokens))
        row += 1 + item.num_draft_tokens
    if not rows:
        return None
    words = (vocab_size + _BITS - 1) // _BITS
    bitmask = torch.full((len(rows), words), -1, dtype=torch.int32, pin_memory=torch.cuda.is_available())
    # The executor writes straight into the tensor's memory (llguidance.torch would do the same
    # but imports torch.compile's machinery, seconds of a worker's start-up).
    if plain:
        _executor().unsafe_compute_mask_ptr(plain, bitmask.data_ptr(), words * 4, len(rows))
    if drafted:
        _executor().unsafe_compute_mask_ptr_with_draft_token(drafted, bitmask.data_ptr(), words * 4, len(rows))
    return StepMasks(rows, bitmask)


def apply_token_bitmask(logits: torch.Tensor, masks: StepMasks) -> torch.Tensor:
    """The logits with every token its row's mask disallows at -inf, on the logits' device; the
    rows without a mask are not touched. The caller's tensor is left as it was."""
    device, vocab = logits.device, logits.shape[-1]
    rows = to_device(masks.rows, torch.int64, device)
    words = masks.bitmask.to(device, non_blocking=True)
    shifts = torch.arange(_BITS, dtype=torch.int32, device=device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(len(masks.rows), -1)[:, :vocab].bool()
    return logits.index_copy(0, rows, logits[rows].masked_fill(~allowed, float("-inf")))
