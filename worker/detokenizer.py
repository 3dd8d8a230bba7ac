"""A sequence's text and its stop conditions, checked after each token it emits: stop strings
(the text is cut before them), stop token ids, end of sequence, max_tokens and max_model_len.
Used only on the engine's thread, so its tokenizer is never shared with another thread."""

from typing import Any

from kvflock.worker.sequence import Sequence


class Detokenizer:
    def __init__(self, tokenizer: Any, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def check_stop(self, seq: Sequence) -> None:
        """Update the text after the sequence's last token and set finish_reason (and
        stop_reason) when that token ends it."""
        p, token = seq.params, seq.output_token_ids[-1]
        if self.tokenizer is not None:
            previous_len = len(seq.output_text)
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=p.skip_special_tokens)
            # Hold back a trailing partial UTF-8 character until its remaining bytes arrive.
            seq.output_text = text.rstrip("\ufffd")
            for stop in p.stop:
                at = seq.output_text.find(stop, max(0, previous_len - len(stop) + 1))
                if at != -1:
                    seq.output_text = seq.output_text[:at]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    return
        if token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif ((p.max_tokens is not None and len(seq.output_token_ids) >= p.max_tokens)
              or seq.num_known_tokens >= self.max_model_len):
            seq.finish_reason = "length"
