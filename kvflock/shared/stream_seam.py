"""The names router and worker share to continue a stream on another worker when the one that
served it goes away (kvflock.router.resume).

A streamed generation that the router may have to continue carries `TOKENS_HEADER: 1`: the
worker then puts, in each chunk's choice, under `EXTENSION`, the token ids that chunk covers,
the length of the choice's text so far and the prompt's token count; the router strips them
before the client sees the chunk. To continue, the router sends the same request with
`CONTINUATION_FIELD` set to the tokens and text length the client has received; the worker
streams only what follows, counting max_tokens, stop strings and usage from the request's start.
"""

TOKENS_HEADER = "x-kvflock-stream-tokens"
EXTENSION = "kvflock"
CONTINUATION_FIELD = "kvflock_continuation"
