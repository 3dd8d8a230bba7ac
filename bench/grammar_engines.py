"""xgrammar against llguidance with the engine's tokenizer: the measurements that chose
kvflock.worker.structured_output's grammar engine.

For the demo model's tokenizer (SmolLM2, loaded as the engine loads it, with the model's vocabulary
size): the time to build each library's tokenizer index, to compile the twenty JSON schemas of
bench/json_schemas.py (until the first mask is filled, since llguidance compiles lazily), and to
fill one token's mask while replaying a valid instance of each schema token by token. Both
produce compact JSON with ", " and ": " separators, the layout the engine asks for.

Needs both libraries installed (only the chosen one is a kvflock dependency):

    pip install xgrammar llguidance
    python bench/grammar_engines.py
"""

import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from json_schemas import SCHEMAS  # bench/json_schemas.py
from kvflock.worker.model.source import read_model_config, resolve_model
from kvflock.worker.model.tokenizer import load_tokenizer

SEPARATORS = (", ", ": ")


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def replay_us(fill: Callable[[], None], accept: Callable[[int], bool], tokens: list[int]) -> list[float]:
    """Microseconds of each mask fill while the instance's tokens are accepted one by one."""
    times = []
    for token in tokens:
        started = time.perf_counter()
        fill()
        times.append(1e6 * (time.perf_counter() - started))
        assert accept(token), f"token {token} refused"
    return times


def measure_xgrammar(tokenizer, vocab: int, instances: list[list[int]]) -> dict[str, float]:
    import xgrammar as xgr

    info, build = timed(lambda: xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    compile_times, fills = [], []
    for (schema, _), tokens in zip(SCHEMAS, instances):
        bitmask = xgr.allocate_token_bitmask(1, vocab)
        compiled, seconds = timed(lambda: compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=SEPARATORS))
        matcher = xgr.GrammarMatcher(compiled)
        _, first = timed(lambda: matcher.fill_next_token_bitmask(bitmask, 0))
        compile_times.append(seconds + first)
        fills += replay_us(lambda: matcher.fill_next_token_bitmask(bitmask, 0), matcher.accept_token, tokens)
    return summary(build, compile_times, fills)


def measure_llguidance(tokenizer, vocab: int, instances: list[list[int]]) -> dict[str, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok, build = timed(lambda: llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab))
    options = {"whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1],
               "lenient": True}  # as xgrammar does, ignore what it cannot enforce (uniqueItems)
    compile_times, fills = [], []
    for (schema, _), tokens in zip(SCHEMAS, instances):
        bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)

        def compile_first_mask() -> object:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
            matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
            assert not matcher.is_error(), matcher.get_error()
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            return matcher

        matcher, seconds = timed(compile_first_mask)
        compile_times.append(seconds)
        fills += replay_us(lambda: llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0),
                           matcher.consume_token, tokens)
    return summary(build, compile_times, fills)


def summary(build: float, compile_times: list[float], fills: list[float]) -> dict[str, float]:
    fills = sorted(fills)
    return {
        "tokenizer index build (s)": build,
        "compile, 20 schemas total (ms)": 1000 * sum(compile_times),
        "compile, slowest schema (ms)": 1000 * max(compile_times),
        "mask fill, median (us)": statistics.median(fills),
        "mask fill, p99 (us)": fills[int(0.99 * (len(fills) - 1))],
        "mask fill, mean (us)": statistics.fmean(fills),
    }


def main() -> None:
    torch.set_num_threads(1)
    source = resolve_model("demo")
    tokenizer = load_tokenizer(source)
    vocab = read_model_config(source).vocab_size
    eos = tokenizer.eos_token_id
    instances = [tokenizer.encode(json.dumps(instance, separators=SEPARATORS), add_special_tokens=False) + [eos]
                 for _, instance in SCHEMAS]
    print(f"SmolLM2 tokenizer, model vocab {vocab}, {sum(map(len, instances))} replayed tokens, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)")
    rows = {"xgrammar": measure_xgrammar(tokenizer, vocab, instances),
            "llguidance": measure_llguidance(tokenizer, vocab, instances)}
    print(f"| measure | {' | '.join(rows)} |\n|---|---|---|")
    for key in rows["xgrammar"]:
        print(f"| {key} | " + " | ".join(f"{row[key]:.3g}" for row in rows.values()) + " |")


if __name__ == "__main__":
    main()
