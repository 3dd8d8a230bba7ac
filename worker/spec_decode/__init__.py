"""Speculative decoding: drafters (n-gram prompt lookup, a draft model) and the verification of their tokens."""
